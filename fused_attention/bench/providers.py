"""Providers: named attention implementations the harness times side by side.

A provider is a function of a case returning the output, plus an optional ``reasons(case)`` that says,
before anything runs, why it cannot serve the case (an empty list when it can). Users benchmark their
own kernel with ``Provider("mine", lambda c: mine(c.query, c.key, c.value, **c.kwargs))``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable

import torch

from ..backends import BACKENDS
from ..functional import scaled_dot_product_attention, varlen_attention
from ..inputs import canonicalize
from ..kvcache import attention_with_kvcache
from ..varlen_inputs import canonicalize_varlen
from .case import Case
from .external import external_providers
from .flex import flex_provider
from .memory import available_bytes
from .position_providers import position_providers
from .provider import BASELINE, Provider


def ours(name: str) -> Provider:
    """One of our attention backends, forced with ``backend=name``; refusals are the dispatcher's."""
    backend = BACKENDS[name]

    def fn(case: Case) -> torch.Tensor:
        if case.is_varlen:
            n = case.spec.seq_q
            cu = case.cu_seqlens
            return varlen_attention(case.query, case.key, case.value, cu, cu, n, n, **case.kwargs, backend=name)
        return scaled_dot_product_attention(case.query, case.key, case.value, **case.kwargs, backend=name)

    def reasons(case: Case) -> list[str]:
        if case.is_varlen:
            n, cu = case.spec.seq_q, case.cu_seqlens
            inputs = canonicalize_varlen(case.query, case.key, case.value, cu, cu, n, n, **case.kwargs)
        else:
            inputs = canonicalize(case.query, case.key, case.value, **case.kwargs)
        with torch.set_grad_enabled(case.spec.mode != "fwd"):
            return backend.not_supported_reasons(inputs)

    # Interpreted Triton on the CPU takes minutes per call at benchmark sizes.
    return Provider(name, fn, reasons, slow_warmup=name == "triton" and _interpreted_triton())


PAGE_SIZE = 16  # the paged decode provider's page (vLLM's default block size)


def _paged_cache(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The case's K and V as a paged cache (``"bhsd"`` pages ``(P, Hkv, PAGE_SIZE, D)`` in shuffled
    order) and its int32 block table; built once per case, outside the timing."""
    if "paged" not in case._dense:
        batch, kv_heads, seq_k, dim = case.key.shape
        pages = -(-seq_k // PAGE_SIZE)
        gen = torch.Generator().manual_seed(0)
        table = torch.randperm(batch * pages, generator=gen).view(batch, pages).to(case.key.device, torch.int32)
        pools = []
        for t in (case.key, case.value):
            padded = torch.nn.functional.pad(t.detach(), (0, 0, 0, pages * PAGE_SIZE - seq_k))
            blocks = padded.view(batch, kv_heads, pages, PAGE_SIZE, dim).transpose(1, 2).reshape(-1, kv_heads, PAGE_SIZE, dim)
            pool = torch.empty_like(blocks)
            pool[table.view(-1).long()] = blocks
            pools.append(pool)
        case._dense["paged"] = (*pools, table)  # type: ignore[assignment]
    return case._dense["paged"]  # type: ignore[return-value]


def ours_paged() -> Provider:
    """``decode`` through :func:`fused_attention.attention_with_kvcache` on a paged copy of the cache
    (pages of ``PAGE_SIZE`` keys in shuffled order), with automatic dispatch."""

    def fn(case: Case) -> torch.Tensor:
        k_pages, v_pages, table = _paged_cache(case)
        seq_k = case.spec.seq_k  # the last page is padded past it
        return attention_with_kvcache(case.query, k_pages, v_pages, cache_seqlens=seq_k, block_table=table, layout="bhsd")

    return Provider(
        "ours-paged", fn, extra_bytes=lambda c: 2 * c.key.numel() * c.key.element_size(), ops=frozenset({"decode"})
    )


def _interpreted_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def per_sequence(case: Case, attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Varlen for providers without a packed API: ``attend`` on each sequence ``(1, H, n, D)`` in turn
    (causal, ``L = S`` per sequence), outputs packed back."""
    outs = []
    for start, end in case.sequences():
        q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in case.grad_inputs())
        outs.append(attend(q, k, v)[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def naive_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    softcap: float | None = None,
    enable_gqa: bool = False,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v``, written out as in the classic tutorials (materializes L x S);
    ``sinks`` as in gpt-oss's eager attention: one more score column per head, dropped after the softmax."""
    if enable_gqa:
        group = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(group, dim=-3), value.repeat_interleave(group, dim=-3)
    scores = (query @ key.transpose(-2, -1)) / math.sqrt(query.shape[-1])
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if is_causal:
        seq_q, seq_k = scores.shape[-2:]
        mask = torch.ones(seq_q, seq_k, dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if sinks is not None:
        sink = sinks.to(scores.dtype).reshape(-1, 1, 1).expand(*scores.shape[:-1], 1)
        return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1] @ value
    return torch.softmax(scores, dim=-1) @ value


def _dense_call(case: Case, attend: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``attend(q, k, v, mask, is_causal, gqa)`` on the case's dense form (per sequence for varlen)."""
    if case.is_varlen:
        return per_sequence(case, lambda q, k, v: attend(q, k, v, None, True, False))
    return attend(case.query, case.key, case.value, case.dense_mask(), case.is_causal, case.enable_gqa)


def dense_memory_reasons(case: Case, score_copies: int) -> list[str]:
    """Refuse (with the numbers) when the dense scores or mask would not fit in half the free memory."""
    spec = case.spec
    if case.is_varlen:  # one sequence at a time
        pairs = spec.heads * max(spec.seq_lengths) ** 2
    else:
        pairs = spec.batch * spec.heads * spec.seq_q * spec.seq_k
    need = score_copies * pairs * spec.torch_dtype.itemsize * (2 if spec.mode != "fwd" else 1)
    budget = available_bytes(spec.device) / 2
    if need > budget:
        gib = 2**30
        return [f"needs about {need / gib:.1f} GiB of dense L x S tensors, over half the free memory ({budget / gib:.1f} GiB)"]
    return []


def naive() -> Provider:
    def fn(case: Case) -> torch.Tensor:
        softcap, sinks = case.kwargs.get("softcap"), case.kwargs.get("sinks")
        return _dense_call(case, lambda q, k, v, m, c, g: naive_attention(q, k, v, m, c, softcap, g, sinks))

    return Provider("naive", fn, lambda c: dense_memory_reasons(c, 3), extra_bytes=Case.extra_bytes)


def torch_sdpa(name: str = BASELINE, sdp_backend: object = None) -> Provider:
    """torch's SDPA (its own dispatch, or one ``SDPBackend`` forced); ops arrive as ``is_causal``,
    ``enable_gqa`` or the dense mask / bias of :meth:`Case.dense_mask`; varlen as one call per sequence.
    A backend that refuses raises, and the row says why."""

    def attend(q, k, v, mask, causal, gqa):
        context = contextlib.nullcontext()
        if sdp_backend is not None:
            from torch.nn.attention import sdpa_kernel

            context = sdpa_kernel(sdp_backend)
        with context:
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa
            )

    def reasons(case: Case) -> list[str]:
        if case.spec.op in ("softcap", "sinks"):
            return [f"torch's SDPA has no {case.spec.op}"]
        return dense_memory_reasons(case, 3) if name == "torch-math" else []

    return Provider(name, lambda c: _dense_call(c, attend), reasons, extra_bytes=Case.extra_bytes)


def torch_providers(device: str) -> list[Provider]:
    """The baseline (torch's own dispatch) and each ``SDPBackend`` on the device: math and the CPU
    flash kernel on the CPU; math, flash, efficient and cuDNN on CUDA (one that cannot serve a row says
    so in its row)."""
    from torch.nn.attention import SDPBackend

    providers = [torch_sdpa(), torch_sdpa("torch-math", SDPBackend.MATH)]
    labels = [("flash", "FLASH_ATTENTION")]
    if torch.device(device).type == "cuda":
        labels += [("efficient", "EFFICIENT_ATTENTION"), ("cudnn", "CUDNN_ATTENTION")]
    for label, attr in labels:
        if hasattr(SDPBackend, attr):
            providers.append(torch_sdpa(f"torch-{label}", getattr(SDPBackend, attr)))
    return providers


def our_providers(device: str) -> list[Provider]:
    """Each of our attention backends (from the dispatcher's registry) that is available on ``device``."""
    dev = torch.device(device)
    return [
        ours(name)
        for name, backend in BACKENDS.items()
        if backend.unavailable_reason() is None and backend.serves_device_reason(dev) is None
    ] + [ours_paged()]


def default_providers(device: str = "cpu", *, quick: bool = False) -> list[Provider]:
    """Every provider for ``device``: our available attention and position backends, torch's SDPA
    backends, FlexAttention, FlashAttention and xformers when installed, and the naive formulas.
    ``quick`` leaves out providers that are slow to warm up."""
    providers = [
        *our_providers(device),
        *torch_providers(device),
        *flex_provider(),
        *external_providers(device),
        naive(),
        *position_providers(device),
    ]
    return [p for p in providers if not (quick and p.slow_warmup)]
