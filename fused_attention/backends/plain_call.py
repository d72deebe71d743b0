"""The common CPU call's short path: ``scaled_dot_product_attention(q, k, v)`` (with ``is_causal``,
``scale`` or ``enable_gqa`` at most) on plain CPU tensors, straight to the extension's kernel.

A tiny call spent twice torch's time on the host (21 us against torch's 10 us for one query row of 8
heads against 64 keys on the 2-vCPU Xeon, 2026-12-06), most of it validating and canonicalizing
arguments in Python, choosing the backend and in the op's eager layer. When every other argument is at
its default and automatic dispatch would choose the ``cpu`` backend as built, the extension's
``attention_plain`` checks the tensors in C++ and makes the full path's kernel call (the same output,
bit for bit); where an input requires grad (torch 2.7+), through a C++ autograd node with the full path's
forward and backward kernels (``csrc/cpu/attention_plain_grad.cpp``; the same gradients, bit for bit). Anything else
takes the full path: tensor subclasses, broadcasting, mismatches (which the full path reports),
autocast, torch function modes, ``torch.compile``, a forced or patched backend.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from ..ops.eager import _any_requires_grad
from .cpu_backend import _OPS, CPU, CpuBackend
from .dispatch import _PRIORITY, BACKENDS, _env_backend

_PLAIN = _OPS.plain if _OPS is not None else None
# Calls that need gradients get a C++ autograd node; compiled autograd runs such a node as one opaque call
# from torch 2.7 on, and refuses it on 2.6: there they take the full path.
_GRAD_NODE = torch.__version__ >= "2.7"  # (a TorchVersion: compared as a version)
# What the automatic choice of the cpu backend rests on, as imported (a patched class answers otherwise).
_CLASS_AS_BUILT = tuple(
    (name, getattr(CpuBackend, name))
    for name in ("attention", "capabilities", "unavailable_reason", "not_supported_reasons", "serves_device_reason")
)


def _cpu_backend_as_built() -> bool:
    """Whether automatic dispatch picks the cpu backend as built for CPU tensors: first in the CPU
    priority, registered under its name, and neither the instance nor its class patched."""
    return (
        CPU.unpatched()
        and BACKENDS.get("cpu") is CPU
        and _PRIORITY.get("cpu", ())[:1] == ("cpu",)
        and all(getattr(CpuBackend, name) is value for name, value in _CLASS_AS_BUILT)
    )


def short_path_open() -> bool:
    """Whether nothing on this thread asks for a full path: not compiling, no autocast, torch function
    mode or forward AD, and automatic dispatch picks the cpu backend as built (the extension's short
    entries check the tensors)."""
    return not (
        torch.compiler.is_compiling()  # first: torch 2.6's Dynamo cannot trace the other checks
        or torch._C._is_any_autocast_enabled()
        or torch._C._is_torch_function_mode_enabled()
        or _forward_ad._current_level >= 0  # dual tensors may come: the full path's errors for forward AD
        or _env_backend() is not None
        or not _cpu_backend_as_built()
    )


def plain_cpu_attention(query: object, key: object, value: object, is_causal: object, scale: object,
                        enable_gqa: object) -> torch.Tensor | None:
    """The output of the call, or None when it must take the full path."""
    if (
        _PLAIN is None
        or not short_path_open()
        or (not _GRAD_NODE and torch.is_grad_enabled() and _any_requires_grad(query, key, value))
    ):
        return None
    return _PLAIN(query, key, value, is_causal, scale, enable_gqa)
