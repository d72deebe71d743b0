"""What is built, what is available, and why not: ``python -m fused_attention info``."""

from __future__ import annotations

import platform

import torch

from . import _extension
from ._version import __version__
from .backends import BACKENDS
from .backends.positional import POSITION_BACKENDS


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
        f"fused_attention {__version__}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
        (
            f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
            f"GPU available: {torch.cuda.is_available()})"
        ),
        f"triton {_triton_version()}",
        f"extension fused_attention._C: {'loaded' if ext.loaded else 'not loaded: ' + ext.reason}"
        + (f" (CUDA kernels compiled in: {ext.has_cuda}; CPU attention kernels: "
           f"{ext.cpu_isa + ' (' + ext.cpu_isa_reason + ')' if ext.cpu_isa else ext.cpu_isa_error})"
           if ext.loaded else ""),
        "",
        "attention backends:",
    ]
    for name, backend in BACKENDS.items():
        reason = backend.unavailable_reason()
        devices = backend.capabilities.device_types
        where = "any device" if devices is None else ", ".join(sorted(devices))
        lines.append(f"  {name:7s} {'available (' + where + ')' if reason is None else 'unavailable: ' + reason}")
    lines += ["", "position-encoding backends (RoPE, sinusoidal):"]
    for name, position_backend in POSITION_BACKENDS.items():
        per_device = []
        for device in ("cpu", "cuda"):
            reason = position_backend.device_reason(torch.device(device))
            if reason is None and device == "cuda" and not torch.cuda.is_available():
                reason = "supported, but no CUDA device is available"  # ("available" read as one is)
            per_device.append(f"{device}: {'available' if reason is None else reason}")
        lines.append(f"  {name:7s} " + "; ".join(per_device))
    return "\n".join(lines)


_FEATURE_COLUMNS = (
    ("causal", "causal"),
    ("window", "window"),
    ("alibi", "ALiBi"),
    ("softcap", "softcap"),
    ("key_lengths", "key_lengths"),
    ("bool_mask", "bool mask"),
    ("float_mask", "float mask"),
    ("mask_grad", "mask grad"),
    ("dropout", "dropout"),
    ("gqa", "GQA"),
    ("lse", "lse"),
    ("varlen", "varlen"),
    ("sinks", "sinks"),
)


def support_table() -> str:
    """The backend x feature table of the README, generated from the backends' declared capabilities
    (a test keeps the README equal to it)."""
    header = ["backend", "devices", "backward", *(title for _, title in _FEATURE_COLUMNS)]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, backend in BACKENDS.items():
        caps = backend.capabilities
        if not caps.dtypes:
            rows.append(f"| {name} | not built yet |" + " |" * (len(header) - 2))
            continue
        devices = "any" if caps.device_types is None else ", ".join(sorted(caps.device_types))
        marks = ["yes" if caps.backward else "no"] + [
            "yes" if feature in caps.features else "no" for feature, _ in _FEATURE_COLUMNS
        ]
        rows.append("| " + " | ".join([name, devices, *marks]) + " |")
    return "\n".join(rows)
