"""Loads the compiled extension ``fused_attention._C`` when it was built, and says why not otherwise.

Importing ``_C`` runs its ``TORCH_LIBRARY(fused_attention, ...)`` registrations, which put the C++ ops
under ``torch.ops.fused_attention``. Their fake (meta) and autograd rules live here, in Python, so
``torch.compile`` can trace the ops. Nothing here ever raises: a missing or broken build only makes the
``cpu`` and ``cuda`` backends unavailable, with the reason below.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExtensionStatus:
    """Whether ``fused_attention._C`` loaded, why (not), and whether its CUDA kernels were compiled in."""

    loaded: bool
    reason: str
    has_cuda: bool


@functools.cache
def load_extension() -> ExtensionStatus:
    """Imports ``fused_attention._C`` once and registers the Python-side rules of its ops."""
    try:
        from . import _C
    except (ImportError, OSError) as exc:
        return ExtensionStatus(False, f"compiled extension fused_attention._C not built: {exc}", False)
    except Exception as exc:  # noqa: BLE001 - a broken build must not break `import fused_attention`
        return ExtensionStatus(
            False, f"compiled extension fused_attention._C failed to load: {type(exc).__name__}: {exc}", False
        )
    try:
        _register_python_rules()
    except Exception as exc:  # noqa: BLE001 - e.g. a stale _C built from other schemas
        return ExtensionStatus(
            False, f"fused_attention._C loaded but its ops could not be registered: {exc}", False
        )
    has_cuda = bool(getattr(_C, "with_cuda", False))
    kernels = "C++ and CUDA kernels" if has_cuda else "C++ kernels only (built without CUDA)"
    return ExtensionStatus(True, f"loaded from {_C.__file__}: {kernels}", has_cuda)


def _register_python_rules() -> None:
    name = "fused_attention::add_sinusoidal_position_encoding"

    @torch.library.register_fake(name)
    def _(x: torch.Tensor, offset: int, base: float, batch_first: bool) -> torch.Tensor:
        # The kernels always return a contiguous tensor, whatever the strides of x.
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    # out = x + PE(positions): the gradient passes through unchanged.
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None, None

    torch.library.register_autograd(name, backward)
