"""Positional encodings in plain PyTorch: the math of the ``torch`` backend for position kernels.

Canonical inputs (see :mod:`fused_attention.position`): rotary takes x ``(B, S, H, D)`` with any
strides, tables ``(T, R/2)`` and int positions ``(B, S)``; the sinusoidal add takes x ``(B, S, D)``.
Math in float32 (float64 for float64 inputs); autograd is PyTorch's own.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool,
    conjugate: bool,
) -> torch.Tensor:
    """Rotates the first ``2 * cos.shape[1]`` features of each ``(b, s, h)`` row by its position's angle."""
    cd = _compute_dtype(x.dtype)
    half = cos.shape[1]
    c = cos.to(cd)[positions].unsqueeze(2)  # (B, S, 1, R/2): one angle per token, shared by heads
    s = sin.to(cd)[positions].unsqueeze(2)
    if conjugate:
        s = -s
    rotated = x[..., : 2 * half].to(cd)
    a, b = (rotated[..., 0::2], rotated[..., 1::2]) if interleaved else (rotated[..., :half], rotated[..., half:])
    # Written into empty_like(x), as the kernels do: the result has x's strides (a concatenation along D
    # of the canonical view came out in the canonical layout, a transposed view for "bhsd" x).
    # (each view is taken after the previous write: autograd tracks a view's base from its creation)
    out = torch.empty_like(x)
    firsts, seconds = (slice(0, 2 * half, 2), slice(1, 2 * half, 2)) if interleaved else (
        slice(0, half), slice(half, 2 * half))
    out[..., firsts] = a * c - b * s
    out[..., seconds] = b * c + a * s
    out[..., 2 * half :] = x[..., 2 * half :]
    return out


def sinusoidal_table(positions: torch.Tensor, dim: int, base: float, dtype: torch.dtype) -> torch.Tensor:
    """``PE[..., 2i] = sin(p * base ** (-2i / dim))``, ``PE[..., 2i + 1] = cos(...)`` for float positions."""
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=dtype) / dim)
    angles = positions.to(dtype).unsqueeze(-1) * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def add_sinusoidal(x: torch.Tensor, offsets: torch.Tensor | None, offset: int, base: float) -> torch.Tensor:
    """x ``(B, S, D)`` + PE at positions ``(offsets[b] or offset) + s``."""
    cd = _compute_dtype(x.dtype)
    steps = torch.arange(x.shape[1], device=x.device)
    positions = (offsets.unsqueeze(1) + steps) if offsets is not None else (steps + offset).unsqueeze(0)
    return (x.to(cd) + sinusoidal_table(positions, x.shape[-1], base, cd)).to(x.dtype)
