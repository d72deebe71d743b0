"""Rotary position embedding (RoPE): one kernel for one tensor or for q and k together, and its launcher.

Layout ``(batch, seq, heads, head_dim)`` with any strides. One program per ``(s, b)`` token reads its
position and its cos/sin row once, then rotates every head of q and then every head of k (GQA: different
head counts), so a q/k pair costs one launch and one read and one write of each element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import batch_slices, device_guard

# Pairs in one (heads x pairs) tile: large enough to keep loads in flight, small enough for registers.
_TILE_PAIRS = 2048


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    n_heads,
    stride_xh,
    stride_xd,
    stride_oh,
    stride_od,
    c,
    s,
    rotary_half,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_R2: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    COPY_TAIL: tl.constexpr,
):
    """Rotates the ``n_heads`` heads of one token (``x_ptr``/``out_ptr`` point at the token's row)."""
    pairs = tl.arange(0, BLOCK_R2)
    pair_mask = pairs < rotary_half
    cols = tl.arange(0, 2 * BLOCK_R2)  # interleaved: one contiguous load, pairs split in registers
    col_mask = cols < 2 * rotary_half
    first = pairs.to(tl.int64)
    second = (pairs + rotary_half).to(tl.int64)
    cols = cols.to(tl.int64)
    tail = 2 * rotary_half + tl.arange(0, BLOCK_TAIL)
    tail_mask = tail < head_dim
    tail = tail.to(tl.int64)
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        head_mask = heads < n_heads
        x_heads = x_ptr + heads.to(tl.int64)[:, None] * stride_xh
        out_heads = out_ptr + heads.to(tl.int64)[:, None] * stride_oh
        if INTERLEAVED:
            mask = head_mask[:, None] & col_mask[None, :]
            x = tl.load(x_heads + cols[None, :] * stride_xd, mask=mask, other=0.0).to(c.dtype)
            a, b = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_R2, 2]))
            rotated = tl.join(a * c[None, :] - b * s[None, :], b * c[None, :] + a * s[None, :])
            rotated = tl.reshape(rotated, [BLOCK_H, 2 * BLOCK_R2])
            tl.store(out_heads + cols[None, :] * stride_od, rotated.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            mask = head_mask[:, None] & pair_mask[None, :]
            a = tl.load(x_heads + first[None, :] * stride_xd, mask=mask, other=0.0).to(c.dtype)
            b = tl.load(x_heads + second[None, :] * stride_xd, mask=mask, other=0.0).to(c.dtype)
            new_a = a * c[None, :] - b * s[None, :]
            new_b = b * c[None, :] + a * s[None, :]
            tl.store(out_heads + first[None, :] * stride_od, new_a.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out_heads + second[None, :] * stride_od, new_b.to(out_ptr.dtype.element_ty), mask=mask)
        if COPY_TAIL:
            tail_2d = head_mask[:, None] & tail_mask[None, :]
            rest = tl.load(x_heads + tail[None, :] * stride_xd, mask=tail_2d)
            tl.store(out_heads + tail[None, :] * stride_od, rest, mask=tail_2d)


@triton.jit
def _rotary_kernel(
    q_ptr,
    q_out_ptr,
    k_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    n_q_heads,
    n_k_heads,
    table_len,
    rotary_half,
    head_dim,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_qob,
    stride_qos,
    stride_qoh,
    stride_qod,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_kob,
    stride_kos,
    stride_koh,
    stride_kod,
    stride_ct,
    stride_cr,
    stride_st,
    stride_sr,
    stride_pb,
    stride_ps,
    BLOCK_R2: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,
    COPY_TAIL: tl.constexpr,
    FP64: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    pos = tl.load(pos_ptr + batch * stride_pb + seq * stride_ps).to(tl.int64)
    pos = tl.minimum(tl.maximum(pos, 0), table_len - 1)  # never read outside the table

    pairs = tl.arange(0, BLOCK_R2)
    pair_mask = pairs < rotary_half
    c = tl.load(cos_ptr + pos * stride_ct + pairs * stride_cr, mask=pair_mask, other=0.0)
    s = tl.load(sin_ptr + pos * stride_st + pairs * stride_sr, mask=pair_mask, other=0.0)
    if FP64:
        c = c.to(tl.float64)
        s = s.to(tl.float64)
    else:
        c = c.to(tl.float32)
        s = s.to(tl.float32)
    if CONJUGATE:
        s = -s

    _rotate_heads(
        q_ptr + batch * stride_qb + seq * stride_qs,
        q_out_ptr + batch * stride_qob + seq * stride_qos,
        n_q_heads, stride_qh, stride_qd, stride_qoh, stride_qod,
        c, s, rotary_half, head_dim,
        BLOCK_HQ, BLOCK_R2, BLOCK_TAIL, INTERLEAVED, COPY_TAIL,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + batch * stride_kb + seq * stride_ks,
        k_out_ptr + batch * stride_kob + seq * stride_kos,
        n_k_heads, stride_kh, stride_kd, stride_koh, stride_kod,
        c, s, rotary_half, head_dim,
        BLOCK_HK, BLOCK_R2, BLOCK_TAIL, INTERLEAVED, COPY_TAIL,
    )  # fmt: skip


def _head_block(n_heads: int, block_r2: int) -> int:
    return max(1, min(triton.next_power_of_2(max(n_heads, 1)), _TILE_PAIRS // block_r2))


def rotary(
    q: torch.Tensor,
    q_out: torch.Tensor,
    k: torch.Tensor | None,
    k_out: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    interleaved: bool,
    conjugate: bool,
) -> None:
    """Writes the rotation of ``q`` (and ``k``) into ``q_out`` (and ``k_out``); an output may be its input.

    ``q``: ``(B, S, Hq, D)``, ``k``: ``(B, S, Hk, D)`` or None, any strides; ``cos``/``sin``:
    ``(T, R/2)``; ``positions``: integer ``(B, S)`` (any strides, stride 0 included), clamped to
    ``[0, T-1]``. Pairs ``(i, i + R/2)`` (half-split) or ``(2i, 2i + 1)`` (interleaved) become
    ``(a cos - b sin, b cos + a sin)`` with ``sin`` negated when ``conjugate``; features ``d >= R`` are
    copied (left alone when the output is the input). Math in float32, float64 for float64 inputs.
    """
    batch, seq_len, n_q_heads, head_dim = q.shape
    if k is None:  # the k half of the kernel runs over zero heads
        k, k_out, n_k_heads = q, q_out, 0
    else:
        n_k_heads = k.shape[2]
    table_len, rotary_half = cos.shape
    # what the kernel's indexing relies on (the functional layer gives users the detailed errors)
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, seq_len, head_dim):
        raise ValueError(f"rotary: k {tuple(k.shape)} does not match q {tuple(q.shape)} but for the heads")
    if tuple(positions.shape) != (batch, seq_len):
        raise ValueError(f"rotary: positions {tuple(positions.shape)} must be (batch, seq) = {(batch, seq_len)}")
    if sin.shape != cos.shape or 2 * rotary_half > head_dim or table_len == 0 < rotary_half:
        raise ValueError(f"rotary: cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} for head dim {head_dim}")
    if batch * seq_len == 0:
        return
    block_r2 = triton.next_power_of_2(max(rotary_half, 1))
    tail = head_dim - 2 * rotary_half
    copy_tail = tail > 0 and q_out is not q
    fp64 = q.dtype == torch.float64 or k.dtype == torch.float64
    with device_guard(q):
        # (slices keep the strides; an output that is its input stays so)
        for entries, (q_, q_out_, k_, k_out_, positions_) in batch_slices(batch, q, q_out, k, k_out, positions):
            _rotary_kernel[(seq_len, entries)](
                q_, q_out_, k_, k_out_, cos, sin, positions_,
                n_q_heads, n_k_heads, table_len, rotary_half, head_dim,
                *q.stride(), *q_out.stride(), *k.stride(), *k_out.stride(),
                *cos.stride(), *sin.stride(), *positions.stride(),
                BLOCK_R2=block_r2,
                BLOCK_HQ=_head_block(n_q_heads, block_r2),
                BLOCK_HK=_head_block(n_k_heads, block_r2),
                BLOCK_TAIL=triton.next_power_of_2(max(tail, 1)),
                INTERLEAVED=interleaved,
                CONJUGATE=conjugate,
                COPY_TAIL=copy_tail,
                FP64=fp64,
            )  # fmt: skip
