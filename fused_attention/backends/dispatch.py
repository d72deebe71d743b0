"""Choosing a backend: per-device priority, forced choices, and explanations.

Dispatch takes the first backend in the device's priority order that gives no reasons. ``backend=`` or
``FUSED_ATTENTION_BACKEND`` forces one; a forced backend that cannot serve raises with its reasons.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

from ..errors import AttentionArgumentError
from ..inputs import AttentionInputs, VarlenInputs
from .base import Backend, decision_cache, requires_grad
from .cpu_backend import CPU
from .pending import CUDA
from .torch_backend import TORCH
from .triton_backend import TRITON

T = TypeVar("T")

BACKENDS: dict[str, Backend] = {b.name: b for b in (TRITON, CUDA, CPU, TORCH)}

# Attention on CUDA goes to triton, then torch, until CUDA attention lands; other devices use torch.
# CPU tensors never go to triton automatically (it serves them only forced, under the interpreter).
_PRIORITY: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}
_DEFAULT_PRIORITY = ("torch",)


def priority(device_type: str) -> tuple[str, ...]:
    return _PRIORITY.get(device_type, _DEFAULT_PRIORITY)


def _lookup(backends: Mapping[str, T], name: object) -> T:
    if not isinstance(name, str) or name not in backends:
        raise AttentionArgumentError(f"backend must be one of {sorted(backends)}, got {name!r}")
    return backends[name]


def get_backend(name: object) -> Backend:
    return _lookup(BACKENDS, name)


# ``os.environ.get`` costs ~0.7 us (key encoding and a Python-level mapping): a tenth of a tiny call's
# dispatch. CPython keeps the environment it maintains in ``os.environ._data`` (encoded keys), which
# every assignment through ``os.environ`` updates; the lookup there costs ~50 ns.
_ENVIRON = os.environ
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("FUSED_ATTENTION_BACKEND") if hasattr(os.environ, "encodekey") else None


def _env_backend() -> str | None:
    """``FUSED_ATTENTION_BACKEND``, or None when unset or empty."""
    if _ENV_DATA is None or _ENV_KEY is None or os.environ is not _ENVIRON:  # os.environ replaced (mocks)
        return os.environ.get("FUSED_ATTENTION_BACKEND") or None
    raw = _ENV_DATA.get(_ENV_KEY)
    return os.environ.get("FUSED_ATTENTION_BACKEND") or None if raw else None


def forced_backend_name(backend: object) -> str | None:
    """The explicitly requested backend: the argument, else ``FUSED_ATTENTION_BACKEND``, else None."""
    if backend is not None:
        return backend  # type: ignore[return-value]  # validated by get_backend
    if torch.compiler.is_compiling():  # what Dynamo traces: the public mapping
        return os.environ.get("FUSED_ATTENTION_BACKEND") or None
    return _env_backend()


def explain(inputs: AttentionInputs | VarlenInputs) -> list[tuple[str, list[str]]]:
    """``(backend, reasons)`` for every backend in this device's priority order, then the rest."""
    order = priority(inputs.device.type)
    names = list(order) + [n for n in BACKENDS if n not in order]
    return [(n, BACKENDS[n].not_supported_reasons(inputs)) for n in names]


def choose(
    backends: Mapping[str, T], reasons: Callable[[T], list[str]], order: tuple[str, ...], backend: object
) -> T:
    """The forced backend if one is named (raising with its reasons if it cannot serve), else the first
    in ``order`` with no reasons. Shared by attention and the position kernels."""
    forced = forced_backend_name(backend)
    if forced is not None:
        chosen = _lookup(backends, forced)
        refusal = reasons(chosen)
        if refusal:
            raise AttentionArgumentError(f"backend {forced!r} cannot serve this call: " + "; ".join(refusal))
        return chosen
    for name in order:
        if not reasons(backends[name]):
            return backends[name]
    details = "; ".join(f"{n}: {', '.join(reasons(b))}" for n, b in backends.items())
    raise AttentionArgumentError(f"no backend can serve this call ({details})")


def automatic_dispatch(backend: object) -> bool:
    """Whether this call's choice is automatic and may come from :data:`decision_cache`."""
    return backend is None and not torch.compiler.is_compiling() and not _env_backend()


def decision_key(query: torch.Tensor, value_head_dim: int, features: frozenset[str], grad: bool) -> tuple:
    """Everything an automatic choice rests on: what a backend's reasons read (device, dtype, head dims,
    features, whether a backward will be needed), and the device's priority order and the backends in
    the table, which tests and users may replace: a changed table is another key, not a stale choice."""
    # (every device's order: device.type alone costs 0.2 us, a third of this key)
    return (query.device, query.dtype, query.shape[-1], value_head_dim, features, grad, _DEFAULT_PRIORITY,
            *_PRIORITY.values(), *BACKENDS.values())


def select(inputs: AttentionInputs | VarlenInputs, backend: object = None) -> Backend:
    """The backend for this call. Automatic choices are remembered by the call's :func:`decision_key`, so
    a repeated call costs one dict lookup; forced backends are checked every time."""
    if automatic_dispatch(backend):
        key = decision_key(inputs.query, inputs.value.shape[-1], inputs.features, requires_grad(inputs))
        chosen = decision_cache.get(key)
        if chosen is None:
            chosen = choose(BACKENDS, lambda b: b.not_supported_reasons(inputs), priority(inputs.device.type), None)
            decision_cache[key] = chosen
        return chosen
    return choose(BACKENDS, lambda b: b.not_supported_reasons(inputs), priority(inputs.device.type), backend)
