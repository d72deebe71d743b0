"""Providers: named attention implementations the harness times side by side.

A provider is a function of a :class:`~.case.Case` returning the output ``(B, H, L, D)``, plus an
optional ``reasons(case)`` that says, before anything runs, why it cannot serve the case (an empty list
when it can). Users benchmark their own kernel with ``Provider("mine", lambda c: mine(c.query, ...))``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backends import BACKENDS
from ..functional import scaled_dot_product_attention
from ..inputs import canonicalize
from .case import Case

BASELINE = "torch-sdpa"  # speedups are measured against this provider, in the same run


@dataclass(frozen=True)
class Provider:
    name: str
    fn: Callable[[Case], torch.Tensor]
    reasons: Callable[[Case], list[str]] | None = None

    def why_not(self, case: Case) -> list[str]:
        return list(self.reasons(case)) if self.reasons is not None else []


def ours(name: str) -> Provider:
    """One of our attention backends, forced with ``backend=name``; refusals are the dispatcher's."""
    backend = BACKENDS[name]

    def fn(case: Case) -> torch.Tensor:
        return scaled_dot_product_attention(case.query, case.key, case.value, **case.kwargs, backend=name)

    def reasons(case: Case) -> list[str]:
        inputs = canonicalize(case.query, case.key, case.value, **case.kwargs)
        with torch.set_grad_enabled(case.spec.mode != "fwd"):
            return backend.not_supported_reasons(inputs)

    return Provider(name, fn, reasons)


def torch_sdpa(name: str = BASELINE, sdp_backend: object = None) -> Provider:
    """torch's SDPA (its own dispatch, or one ``SDPBackend`` forced); ops arrive as ``is_causal`` or the
    dense mask / bias of :meth:`Case.dense_mask`. A backend that refuses raises, and the row says why."""

    def fn(case: Case) -> torch.Tensor:
        context = contextlib.nullcontext()
        if sdp_backend is not None:
            from torch.nn.attention import sdpa_kernel

            context = sdpa_kernel(sdp_backend)
        with context:
            return torch.nn.functional.scaled_dot_product_attention(
                case.query, case.key, case.value, attn_mask=case.dense_mask(), is_causal=case.is_causal
            )

    return Provider(name, fn)


def naive_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v``, written out as in the classic tutorials (materializes L x S)."""
    scores = (query @ key.transpose(-2, -1)) / math.sqrt(query.shape[-1])
    if is_causal:
        seq_q, seq_k = scores.shape[-2:]
        mask = torch.ones(seq_q, seq_k, dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1) @ value


def naive() -> Provider:
    return Provider("naive", lambda c: naive_attention(c.query, c.key, c.value, c.dense_mask(), c.is_causal))


def torch_providers(device: str) -> list[Provider]:
    """The baseline (torch's own dispatch) and each ``SDPBackend`` on the device: math on the CPU;
    math, flash, efficient and cuDNN on CUDA (one that cannot serve a row says so in its row)."""
    from torch.nn.attention import SDPBackend

    providers = [torch_sdpa(), torch_sdpa("torch-math", SDPBackend.MATH)]
    if torch.device(device).type == "cuda":
        for label, attr in (
            ("flash", "FLASH_ATTENTION"),
            ("efficient", "EFFICIENT_ATTENTION"),
            ("cudnn", "CUDNN_ATTENTION"),
        ):
            if hasattr(SDPBackend, attr):
                providers.append(torch_sdpa(f"torch-{label}", getattr(SDPBackend, attr)))
    return providers


def default_providers(device: str = "cpu") -> list[Provider]:
    """Every available attention backend of ours that serves ``device``, torch's SDPA providers, naive."""
    dev = torch.device(device)
    mine = []
    for name, backend in BACKENDS.items():
        types = backend.capabilities.device_types
        serves = backend.unavailable_reason() is None and (types is None or dev.type in types)
        if serves and backend.device_reason(dev) is None:
            mine.append(ours(name))
    return [*mine, *torch_providers(device), naive()]
