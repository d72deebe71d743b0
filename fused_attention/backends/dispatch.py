"""Choosing a backend: per-device priority, forced choices, and explanations.

Dispatch takes the first backend in the device's priority order that gives no reasons. ``backend=`` or
``FUSED_ATTENTION_BACKEND`` forces one; a forced backend that cannot serve raises with its reasons.
"""

from __future__ import annotations

import os

from ..errors import AttentionArgumentError
from ..inputs import AttentionInputs, VarlenInputs
from .base import Backend
from .pending import CPU, CUDA, TRITON
from .torch_backend import TORCH

BACKENDS: dict[str, Backend] = {b.name: b for b in (TRITON, CUDA, CPU, TORCH)}

# Attention on CUDA goes to triton, then torch, until CUDA attention lands; other devices use torch.
_PRIORITY: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}
_DEFAULT_PRIORITY = ("torch",)


def priority(device_type: str) -> tuple[str, ...]:
    return _PRIORITY.get(device_type, _DEFAULT_PRIORITY)


def get_backend(name: object) -> Backend:
    if not isinstance(name, str) or name not in BACKENDS:
        raise AttentionArgumentError(f"backend must be one of {sorted(BACKENDS)}, got {name!r}")
    return BACKENDS[name]


def forced_backend_name(backend: object) -> str | None:
    """The explicitly requested backend: the argument, else ``FUSED_ATTENTION_BACKEND``, else None."""
    if backend is not None:
        return backend  # type: ignore[return-value]  # validated by get_backend
    return os.environ.get("FUSED_ATTENTION_BACKEND") or None


def explain(inputs: AttentionInputs | VarlenInputs) -> list[tuple[str, list[str]]]:
    """``(backend, reasons)`` for every backend in this device's priority order, then the rest."""
    order = priority(inputs.device.type)
    names = list(order) + [n for n in BACKENDS if n not in order]
    return [(n, BACKENDS[n].not_supported_reasons(inputs)) for n in names]


def select(inputs: AttentionInputs | VarlenInputs, backend: object = None) -> Backend:
    forced = forced_backend_name(backend)
    if forced is not None:
        chosen = get_backend(forced)
        reasons = chosen.not_supported_reasons(inputs)
        if reasons:
            raise AttentionArgumentError(f"backend {chosen.name!r} cannot serve this call: " + "; ".join(reasons))
        return chosen
    for name in priority(inputs.device.type):
        if not BACKENDS[name].not_supported_reasons(inputs):
            return BACKENDS[name]
    details = "; ".join(f"{n}: {', '.join(r)}" for n, r in explain(inputs))
    raise AttentionArgumentError(f"no backend can serve this call ({details})")
