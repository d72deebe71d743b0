"""Sinusoidal position encoding fused into the add: ``x + PE`` with sin/cos computed in the kernel.

One read and one write of ``x``; no ``(seq, dim)`` table is built or read. Layout ``(batch, seq, dim)``
with any strides (sequence-first input arrives as a transposed view). A program covers a (rows x
features) tile; without per-batch offsets every batch shares the encoding, so the program computes the
tile's sin/cos once and adds it to that tile of every batch.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from . import batch_slices, device_guard

_TILE_PAIRS = 2048  # (rows x pairs) per program
_MAX_BLOCK_PAIRS = 512


@triton.jit
def _add_sinusoidal_kernel(
    x_ptr,
    out_ptr,
    offsets_ptr,
    offset,
    n_batch,
    seq_len,
    dim,
    log2_base_hi,
    log2_base_lo,
    stride_xb,
    stride_xs,
    stride_xd,
    stride_ob,
    stride_os,
    stride_od,
    stride_offsets,
    HAS_OFFSETS: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    pairs = tl.program_id(2) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    cols = tl.program_id(2) * 2 * BLOCK_PAIRS + tl.arange(0, 2 * BLOCK_PAIRS)
    mask = (rows < seq_len)[:, None] & (cols < dim)[None, :]
    if HAS_OFFSETS:  # one batch per program
        first_batch = tl.program_id(1)
        end_batch = first_batch + 1
        start = tl.load(offsets_ptr + first_batch.to(tl.int64) * stride_offsets).to(tl.int64)
    else:  # every batch shares the encoding: compute it once, add it to each
        first_batch = 0
        end_batch = n_batch
        start = offset
    positions = start + rows.to(tl.int64)

    # base**(-2i/dim) in float64 whatever the dtype (once per program), so it is correctly rounded
    # before the float32 product; log2(base) comes split in two float32 scalars to keep float64 precision.
    exponent = (2 * pairs).to(tl.float64) / dim
    inv_freq = tl.exp2(-(exponent * log2_base_hi + exponent * log2_base_lo))
    if FP64:
        angle = positions.to(tl.float64)[:, None] * inv_freq[None, :]
    else:
        angle = positions.to(tl.float32)[:, None] * inv_freq.to(tl.float32)[None, :]
    # interleave (sin, cos) in registers so that x is read and written in contiguous rows
    encoding = tl.reshape(tl.join(tl.sin(angle), tl.cos(angle)), [BLOCK_S, 2 * BLOCK_PAIRS])

    x_offsets = rows.to(tl.int64)[:, None] * stride_xs + cols.to(tl.int64)[None, :] * stride_xd
    out_offsets = rows.to(tl.int64)[:, None] * stride_os + cols.to(tl.int64)[None, :] * stride_od
    for batch in range(first_batch, end_batch):
        batch = tl.cast(batch, tl.int64)
        x = tl.load(x_ptr + batch * stride_xb + x_offsets, mask=mask, other=0.0).to(encoding.dtype)
        tl.store(out_ptr + batch * stride_ob + out_offsets, (x + encoding).to(out_ptr.dtype.element_ty), mask=mask)


def add_sinusoidal(
    x: torch.Tensor, out: torch.Tensor, offsets: torch.Tensor | None, offset: int, base: float
) -> None:
    """Writes ``x + PE`` into ``out``. ``x``, ``out``: ``(B, S, D)``, any strides, D even; row ``s`` of
    batch ``b`` has position ``(offsets[b] if offsets is not None else offset) + s`` and
    ``PE[p, 2i] = sin(p * base**(-2i/D))``, ``PE[p, 2i+1] = cos(p * base**(-2i/D))``; math in float32
    (float64 for float64 ``x``)."""
    batch, seq_len, dim = x.shape
    if dim % 2:
        raise ValueError(f"add_sinusoidal: the feature dim must be even, got {dim}")
    if offsets is not None and tuple(offsets.shape) != (batch,):
        raise ValueError(f"add_sinusoidal: offsets {tuple(offsets.shape)} must be (batch,) = ({batch},)")
    if x.numel() == 0:
        return
    log2_base = math.log2(base)
    log2_base_hi = struct.unpack("f", struct.pack("f", log2_base))[0]  # rounded to float32
    block_pairs = min(triton.next_power_of_2(dim // 2), _MAX_BLOCK_PAIRS)
    block_s = min(max(1, _TILE_PAIRS // block_pairs), triton.next_power_of_2(seq_len))
    # with offsets, a program per batch entry (the grid's second axis: slices of the batch); without, each
    # program adds its encoding to every entry
    starts = offsets if offsets is not None else x  # (unread without offsets)
    parts = batch_slices(batch, x, out, starts) if offsets is not None else [(batch, (x, out, starts))]
    with device_guard(x):
        for entries, (x_, out_, starts_) in parts:
            grid = (triton.cdiv(seq_len, block_s), entries if offsets is not None else 1, triton.cdiv(dim // 2, block_pairs))
            _add_sinusoidal_kernel[grid](
                x_, out_, starts_, offset, entries, seq_len, dim,
                log2_base_hi, log2_base - log2_base_hi,
                *x.stride(), *out.stride(), offsets.stride(0) if offsets is not None else 0,
                HAS_OFFSETS=offsets is not None,
                FP64=x.dtype == torch.float64,
                BLOCK_S=block_s,
                BLOCK_PAIRS=block_pairs,
            )  # fmt: skip
