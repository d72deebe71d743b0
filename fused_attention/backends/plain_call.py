"""The common CPU call's short path: ``scaled_dot_product_attention(q, k, v)`` (with ``is_causal``,
``scale`` or ``enable_gqa`` at most) on plain CPU tensors, straight to the extension's kernel.

A tiny call spent twice torch's time on the host (21 us against torch's 10 us for one query row of 8
heads against 64 keys on the 2-vCPU Xeon, 2026-12-06), most of it validating and canonicalizing
arguments in Python, choosing the backend and in the op's eager layer. When every other argument is at
its default and automatic dispatch would choose the ``cpu`` backend as built, the extension's
``attention_plain`` checks the tensors in C++ and makes the full path's kernel call (the same output,
bit for bit). Anything else takes the full path: tensor subclasses, broadcasting, mismatches (which the
full path reports), gradients, autocast, torch function modes, ``torch.compile``, a forced or patched
backend.
"""

from __future__ import annotations

import torch

from .cpu_backend import _OPS, CPU
from .dispatch import _env_backend

_PLAIN = _OPS.plain if _OPS is not None else None


def plain_cpu_attention(query: object, key: object, value: object, is_causal: object, scale: object,
                        enable_gqa: object) -> torch.Tensor | None:
    """The output of the call, or None when it must take the full path."""
    if (
        _PLAIN is None
        or torch._C._is_any_autocast_enabled()
        or torch._C._is_torch_function_mode_enabled()
        or torch.compiler.is_compiling()
        or not CPU.unpatched()
        or _env_backend() is not None
    ):
        return None
    return _PLAIN(query, key, value, is_causal, scale, enable_gqa)
