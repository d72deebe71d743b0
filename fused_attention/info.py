"""What is built, what is available, and why not: ``python -m fused_attention info``."""

from __future__ import annotations

import platform

import torch

from . import _extension
from .backends import BACKENDS


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def info() -> str:
    """A human-readable report of versions, the compiled extension and each backend's availability."""
    ext = _extension.load_extension()
    lines = [
        f"fused_attention {_version()}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
        f"GPU available: {torch.cuda.is_available()})",
        f"triton {_triton_version()}",
        f"extension fused_attention._C: {'loaded' if ext.loaded else 'not loaded: ' + ext.reason}"
        + (f" (CUDA kernels compiled in: {ext.has_cuda})" if ext.loaded else ""),
        "",
        "attention backends:",
    ]
    for name, backend in BACKENDS.items():
        reason = backend.unavailable_reason()
        devices = backend.capabilities.device_types
        where = "any device" if devices is None else ", ".join(sorted(devices))
        lines.append(f"  {name:7s} {'available (' + where + ')' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def _version() -> str:
    from . import __version__

    return __version__
