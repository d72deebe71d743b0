"""The combine step of split-KV decoding in one Triton launch: each query row's key splits, written by
:mod:`.kvcache_decode` as normalized float32 outputs with their log-sum-exp, merge exactly into the
row's output (stored in the caller's dtype) and lse, with attention sinks folded in as one more part
whose output is 0: the arithmetic of :mod:`fused_attention.merge` in one launch, where torch ops take
about 15 small kernels a step (a pairwise merge took ~30 a split: 8 ms a decode step on an H200). The
splits are read in a fixed order, so the result is deterministic for a given split count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import empty_in_layout_of
from .attention_launch import padded_head_dim


@triton.jit
def kvcache_combine_kernel(
    Parts, PartLse, Sinks, Out, Lse,
    splits, heads, seq_q, value_dim,
    stride_ps, stride_ls, stride_ob, stride_oh, stride_ol,
    SINKS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # one program per query row r of (B, H, L), row-major; parts (splits, B, H, L, Dv) contiguous
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < value_dim
    top = tl.full((), float("-inf"), tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(PartLse + offs_s.to(tl.int64) * stride_ls + row, mask=offs_s < splits, other=float("-inf"))
        top = tl.maximum(top, tl.max(lse, 0))
    if SINKS:
        sink = tl.load(Sinks + (row // seq_q) % heads)
        top = tl.maximum(top, sink)
    base = tl.where(top == float("-inf"), 0.0, top)  # no part saw a key: every weight is 0, never NaN
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_DV,), tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < splits
        w = tl.exp(tl.load(PartLse + offs_s.to(tl.int64) * stride_ls + row, mask=s_ok, other=float("-inf")) - base)
        part = tl.load(
            Parts + offs_s[:, None].to(tl.int64) * stride_ps + row * value_dim + offs_d[None, :],
            mask=s_ok[:, None] & d_ok[None, :], other=0.0,
        )
        total += tl.sum(w, 0)
        acc += tl.sum(part * w[:, None], 0)
    if SINKS:
        total += tl.exp(sink - base)
    out = acc / tl.where(total == 0.0, 1.0, total)
    out_row = Out + (row // (heads * seq_q)) * stride_ob + (row // seq_q) % heads * stride_oh + row % seq_q * stride_ol
    tl.store(out_row + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)
    tl.store(Lse + row, base + tl.log(total))  # log(0) = -inf for a row that saw nothing


def kvcache_combine(
    parts: torch.Tensor, part_lse: torch.Tensor, sinks: torch.Tensor | None, query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, H, L, Dv), lse (B, H, L) float32)`` from the splits' ``parts (splits, B, H, L, Dv)`` and
    ``part_lse (splits, B, H, L)`` (float32, contiguous, as :func:`.kvcache_decode.kvcache_decode` writes
    them); ``sinks`` ``(H,)`` float32 or None. ``out`` has the dtype and memory layout of ``query`` ``(B,
    H, L, D)``, as the regular attention ops' (:func:`fused_attention.kernels.layout.empty_in_layout_of`)."""
    splits, batch, heads, seq_q, value_dim = parts.shape
    out = empty_in_layout_of(query, value_dim)
    lse = torch.empty(part_lse.shape[1:], device=parts.device, dtype=torch.float32)
    rows = batch * heads * seq_q
    if rows == 0:
        return out, lse
    if sinks is not None:
        sinks = sinks.to(torch.float32).contiguous()
    kvcache_combine_kernel[(rows,)](
        parts, part_lse, sinks if sinks is not None else lse, out, lse,
        splits, heads, seq_q, value_dim, parts.stride(0), part_lse.stride(0), *out.stride()[:3],
        SINKS=sinks is not None, BLOCK_S=min(32, triton.next_power_of_2(splits)),
        BLOCK_DV=padded_head_dim(value_dim), num_warps=4,
    )
    return out, lse
