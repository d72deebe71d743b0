"""Backends for the positional-encoding kernels, dispatched like attention (same names and rules).

Each backend serves the canonical forms of :mod:`fused_attention.position`: rotary on x ``(B, S, H, D)``
with tables ``(T, R/2)`` and positions ``(B, S)``, and the sinusoidal add on x ``(B, S, D)``.
"""

from __future__ import annotations

import functools

import torch

from .. import _extension
from ..kernels import position_torch
from ..ops.position_rules import PositionOps
from .base import ForgetsDecisions
from .dispatch import automatic_dispatch, choose

# Loaded once at import: a plain value that torch.compile can read while tracing dispatch.
_EXTENSION = _extension.load_extension()
_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
# Automatic choices by (device, dtype), all that a position backend's reasons read, and the tables.
_decisions: dict[tuple, PositionBackend] = {}


class PositionBackend(ForgetsDecisions):
    """Base: ``reasons(x)`` says why the backend cannot serve a tensor; the methods run the kernels."""

    decisions = _decisions
    name = ""
    device_types: frozenset[str] | None = None
    dtypes = _DTYPES

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def device_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot serve tensors on ``device`` at all, or None."""
        if self.device_types is not None and device.type not in self.device_types:
            return f"device {device.type} not supported (supports {sorted(self.device_types)})"
        return self.unavailable_reason(device)

    def reasons(self, x: torch.Tensor) -> list[str]:
        device_reason = self.device_reason(x.device)
        if device_reason:
            return [device_reason]
        reasons = []
        if x.dtype not in self.dtypes:
            reasons.append(f"dtype {x.dtype} not supported")
        return reasons

    def rotary(self, x, cos, sin, positions, interleaved: bool, conjugate: bool) -> torch.Tensor:
        raise NotImplementedError

    def rotary_(self, x, cos, sin, positions, interleaved: bool, conjugate: bool) -> None:
        raise NotImplementedError

    def rotary_qk(self, q, k, cos, sin, positions, interleaved: bool, conjugate: bool):
        raise NotImplementedError

    def add_sinusoidal(self, x, offsets, offset: int, base: float) -> torch.Tensor:
        raise NotImplementedError


class TorchPositions(PositionBackend):
    """Pure PyTorch, any device."""

    name = "torch"

    def rotary(self, x, cos, sin, positions, interleaved, conjugate):
        with torch.profiler.record_function("fused_attention::torch_rotary"):
            return position_torch.rotary(x, cos, sin, positions, interleaved, conjugate)

    def rotary_(self, x, cos, sin, positions, interleaved, conjugate):
        # Under autograd the rotation keeps views of its input for the tables' gradient: it reads a copy,
        # which the write into x leaves intact (it read x itself, and the backward found x overwritten).
        recorded = torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)
        source = x.clone() if recorded else x
        x.copy_(self.rotary(source, cos, sin, positions, interleaved, conjugate))

    def rotary_qk(self, q, k, cos, sin, positions, interleaved, conjugate):
        return (
            self.rotary(q, cos, sin, positions, interleaved, conjugate),
            self.rotary(k, cos, sin, positions, interleaved, conjugate),
        )

    def add_sinusoidal(self, x, offsets, offset, base):
        with torch.profiler.record_function("fused_attention::torch_add_sinusoidal"):
            return position_torch.add_sinusoidal(x, offsets, offset, base)


class ExtensionPositions(PositionBackend):
    """The compiled extension's kernels (``csrc/cpu`` or ``csrc/cuda``) for one device type."""

    def __init__(self, name: str, device_type: str):
        self.name = name
        self.device_types = frozenset({device_type})

    def unavailable_reason(self, device: torch.device) -> str | None:
        status = _EXTENSION
        if not status.loaded:
            return status.reason
        if self.name == "cuda" and not status.has_cuda:
            return "the extension was built without its CUDA kernels"
        if self.name == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        return None

    def rotary(self, x, cos, sin, positions, interleaved, conjugate):
        return _extension_ops().rotary(x, cos, sin, positions, interleaved, conjugate)

    def rotary_(self, x, cos, sin, positions, interleaved, conjugate):
        torch.ops.fused_attention.rotary_(x, cos, sin, positions, interleaved, conjugate)

    def rotary_qk(self, q, k, cos, sin, positions, interleaved, conjugate):
        return _extension_ops().rotary_qk(q, k, cos, sin, positions, interleaved, conjugate)

    def add_sinusoidal(self, x, offsets, offset, base):
        return _extension_ops().add_sinusoidal(x, offsets, offset, base)


class TritonPositions(PositionBackend):
    """Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"

    def unavailable_reason(self, device: torch.device) -> str | None:
        from ..kernels.triton import triton_unavailable_reason

        return triton_unavailable_reason(device)

    def rotary(self, x, cos, sin, positions, interleaved, conjugate):
        return _triton_ops().rotary(x, cos, sin, positions, interleaved, conjugate)

    def rotary_(self, x, cos, sin, positions, interleaved, conjugate):
        _triton_ops()  # (registers the triton_* ops on first use)
        torch.ops.fused_attention.triton_rotary_(x, cos, sin, positions, interleaved, conjugate)

    def rotary_qk(self, q, k, cos, sin, positions, interleaved, conjugate):
        return _triton_ops().rotary_qk(q, k, cos, sin, positions, interleaved, conjugate)

    def add_sinusoidal(self, x, offsets, offset, base):
        return _triton_ops().add_sinusoidal(x, offsets, offset, base)


_EXTENSION_OPS = (
    "fused_attention::rotary", "fused_attention::rotary_qk", "fused_attention::add_sinusoidal_position_encoding"
)
_TRITON_OPS = (
    "fused_attention::triton_rotary", "fused_attention::triton_rotary_qk", "fused_attention::triton_add_sinusoidal"
)


def _ops(names: tuple[str, str, str]) -> PositionOps:
    """Eager calls go through EagerOp (functorch's transforms refuse torch.library's own autograd); while
    torch.compile traces, the registered ops are what it records."""
    if torch.compiler.is_compiling():
        return PositionOps.registered(*names)
    return _eager_ops(names)


@functools.cache  # (module-level: an attribute set on a backend clears its decisions)
def _eager_ops(names: tuple[str, str, str]) -> PositionOps:
    return PositionOps.eager(*names)


def _extension_ops() -> PositionOps:
    return _ops(_EXTENSION_OPS)


def _triton_ops() -> PositionOps:
    from ..ops import triton_positional  # noqa: F401  (registers the triton_* ops on first use)

    return _ops(_TRITON_OPS)


POSITION_BACKENDS: dict[str, PositionBackend] = {
    b.name: b
    for b in (TritonPositions(), ExtensionPositions("cuda", "cuda"), ExtensionPositions("cpu", "cpu"), TorchPositions())
}
# Automatic dispatch never picks the interpreted Triton for CPU tensors; force it with backend="triton".
_PRIORITY = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def select_position_backend(x: torch.Tensor, backend: object = None) -> PositionBackend:
    if automatic_dispatch(backend):
        # (and the tables, which may be patched: see dispatch.decision_key)
        key = (x.device, x.dtype, *_PRIORITY.values(), *POSITION_BACKENDS.values())
        chosen = _decisions.get(key)
        if chosen is None:
            order = _PRIORITY.get(x.device.type, ("torch",))
            chosen = _decisions[key] = choose(POSITION_BACKENDS, lambda b: b.reasons(x), order, None)
        return chosen
    return choose(POSITION_BACKENDS, lambda b: b.reasons(x), _PRIORITY.get(x.device.type, ("torch",)), backend)
