"""Split-KV attention over a (paged) KV cache in Triton: FlashDecoding's schedule.

Decode steps have few query rows and many keys, so one program per (batch entry, kv head, key split):
the ``G * Lq`` query rows of the KV head's group (``G = Hq / Hkv``) form the M dimension of one tile (of
several, beyond 64 rows), so each K and V row is read once for all the query heads that share it, and the keys of a sequence are cut
into ``num_splits`` ranges that run in parallel. Each split writes its normalized partial output and
log-sum-exp in float32; :func:`.kvcache_combine.kvcache_combine` merges them exactly (a split with
no visible key has lse ``-inf`` and contributes nothing).

A contiguous cache is a paged one with a single page of ``S_max`` keys per batch entry (its page table
holds the entry's cache row), so one kernel reads both: key ``j`` of entry ``b`` lives in page
``table[b, j // page_size]`` at row ``j % page_size``. Positions follow the cache's bottom-right
alignment (query row ``i`` of ``Lq`` sits at ``total[b] - Lq + i``), as in :mod:`fused_attention.kvcache.masks`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_launch import dot_precision, padded_head_dim, window_within
from .attention_tiles import tanh


@triton.jit
def kvcache_decode_kernel(
    Q, K, V, Table, Total, Leftpad, Alibi, Out, Lse,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_vp, stride_vs, stride_vh, stride_vd,
    stride_tb, stride_ab, stride_ah,
    stride_os, stride_ob, stride_oh, stride_ol, stride_od,
    stride_ls, stride_lb, stride_lh, stride_ll,
    n_kv_heads, groups, seq_q, page_size, head_dim, value_head_dim, num_splits,
    scale, softcap, window_left, window_right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, LEFTPAD: tl.constexpr, DOT_PRECISION: tl.constexpr, ONE_PAGE_TILES: tl.constexpr,
):
    row_blocks = tl.cdiv(groups * seq_q, BLOCK_M)
    b = tl.program_id(0) // (n_kv_heads * row_blocks)
    h = tl.program_id(0) // row_blocks % n_kv_heads
    split = tl.program_id(1)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)

    # Row m of the group's rows is query row i = m % seq_q of query head h * groups + m // seq_q.
    offs_m = tl.program_id(0) % row_blocks * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < groups * seq_q
    i = offs_m % seq_q
    head = h * groups + offs_m // seq_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d64, dv64 = offs_d[None, :].to(tl.int64), offs_dv[None, :].to(tl.int64)  # a feature stride may be large
    q = tl.load(
        Q + b64 * stride_qb + i[:, None].to(tl.int64) * stride_ql + head[:, None].to(tl.int64) * stride_qh
        + d64 * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0,
    )
    total = tl.load(Total + b).to(tl.int32)
    pos = total - seq_q + i  # each row's key position
    first = 0
    if LEFTPAD:
        first = tl.load(Leftpad + b).to(tl.int32)
    slope = tl.zeros([BLOCK_M], tl.float32)
    if ALIBI:
        slope = tl.load(Alibi + b64 * stride_ab + head.to(tl.int64) * stride_ah, mask=row_ok, other=0.0)

    # This split's keys: an equal share, in whole BLOCK_N tiles, of the keys that some row of the call can
    # see: from the left window's edge of its first row (and past left padding), so that a sliding-window
    # model's decode step over a long cache reads its window, not the whole cache.
    start = 0
    if LEFTPAD:
        start = first
    if WINDOW_LEFT:
        start = tl.maximum(start, total - seq_q - window_left)
    start = tl.maximum(start, 0) // BLOCK_N * BLOCK_N  # whole tiles: a tile stays within one page
    tiles = tl.maximum(tl.cdiv(total - start, BLOCK_N), 0)
    per_split = tl.cdiv(tiles, num_splits)
    lo = start + split * per_split * BLOCK_N
    hi = tl.minimum(lo + per_split * BLOCK_N, total)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs_n < hi
        if ONE_PAGE_TILES:  # the tile's keys are consecutive rows of one page: affine addresses
            page = tl.load(Table + b64 * stride_tb + n0 // page_size).to(tl.int64)
            rows = page * stride_kp + (n0 % page_size + tl.arange(0, BLOCK_N)).to(tl.int64) * stride_ks
            v_rows = page * stride_vp + (n0 % page_size + tl.arange(0, BLOCK_N)).to(tl.int64) * stride_vs
        else:  # pages smaller than a tile: each key's row through the table
            page = tl.load(Table + b64 * stride_tb + offs_n // page_size, mask=key_ok, other=0).to(tl.int64)
            slot = (offs_n % page_size).to(tl.int64)
            rows = page * stride_kp + slot * stride_ks
            v_rows = page * stride_vp + slot * stride_vs
        k = tl.load(
            K + rows[:, None] + h64 * stride_kh + d64 * stride_kd,
            mask=key_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        if SOFTCAP:
            s = softcap * tanh(s / softcap)
        j = offs_n[None, :]
        if ALIBI:
            s = s - slope[:, None] * tl.abs(pos[:, None] - j).to(tl.float32)
        visible = row_ok[:, None] & key_ok[None, :]
        if LEFTPAD:
            visible = visible & (j >= first)
        if WINDOW_LEFT:
            visible = visible & (j >= pos[:, None] - window_left)
        if WINDOW_RIGHT:
            visible = visible & (j <= pos[:, None] + window_right)
        s = tl.where(visible, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        base = tl.where(new_max == float("-inf"), 0.0, new_max)  # exp(-inf - 0) = 0, never NaN
        alpha = tl.exp(row_max - base)
        p = tl.exp(s - base[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        v = tl.load(
            V + v_rows[:, None] + h64 * stride_vh + dv64 * stride_vd,
            mask=key_ok[:, None] & (offs_dv[None, :] < value_head_dim), other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    seen = row_sum > 0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    lse = tl.where(seen, row_max + tl.log(tl.where(seen, row_sum, 1.0)), float("-inf"))
    split64 = split.to(tl.int64)
    out_rows = Out + split64 * stride_os + b64 * stride_ob + head[:, None].to(tl.int64) * stride_oh + i[:, None] * stride_ol
    tl.store(out_rows + dv64 * stride_od, out, mask=row_ok[:, None] & (offs_dv[None, :] < value_head_dim))
    lse_rows = Lse + split64 * stride_ls + b64 * stride_lb + head.to(tl.int64) * stride_lh + i * stride_ll
    tl.store(lse_rows, lse, mask=row_ok)


def _tile(dtype: torch.dtype, rows: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)``: the group's rows in one tile up to 64 (32 in float32), key tiles
    of 32 (16 in float32). Compiled ahead of time for sm_80 and sm_90 at head dim 128 with the JIT's
    specialization, every choice here builds without spills (float32's IEEE products need the smaller
    tiles)."""
    wide = dtype != torch.float32
    block_m = min(max(16, triton.next_power_of_2(rows)), 64 if wide else 32)
    return block_m, 32 if wide else 16, 4 if block_m <= (32 if wide else 16) else 8


_MIN_TILE_KEYS = 16


def default_splits(batch: int, kv_heads: int, max_keys: int, device: torch.device) -> int:
    """Enough key splits for two programs per streaming multiprocessor, at least 4 key tiles a split;
    1 on the CPU (the interpreter runs programs one after another)."""
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    tiles = -(-max_keys // _MIN_TILE_KEYS)
    return max(1, min(-(-programs // (batch * kv_heads)), tiles // 4))


def kvcache_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    total: torch.Tensor,
    *,
    contiguous: bool,
    num_splits: int,
    scale: float,
    is_causal: bool,
    window: tuple[int, int],
    softcap: float | None,
    alibi_slopes: torch.Tensor | None,
    leftpad: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split ``(out (splits, B, Hq, Lq, Dv), lse (splits, B, Hq, Lq))`` in float32.

    ``q`` ``(B, Lq, Hq, D)``; ``k_cache``/``v_cache`` ``(pages, page_size, Hkv, D)`` (any strides; a
    contiguous cache is one page per row); ``table`` int ``(B, pages per entry)``; ``total`` int ``(B,)``
    keys of each entry (appended ones included); ``alibi_slopes`` ``(1 or B, Hq)`` float32;
    ``leftpad`` int ``(B,)``. ``contiguous``: the table has one page per entry (a contiguous cache), so
    every key tile lies in one page whatever ``page_size`` is. ``window`` is FlashAttention's ``(left, right)``, -1 unbounded; causal
    folds into ``right <= 0``.
    """
    batch, seq_q, heads, head_dim = q.shape
    page_size, kv_heads, value_dim = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    groups = heads // kv_heads
    left, right = window
    reach = page_size * table.shape[1] + seq_q  # past any key position of the call
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    out = torch.empty(num_splits, batch, heads, seq_q, value_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(num_splits, batch, heads, seq_q, device=q.device, dtype=torch.float32)
    alibi = alibi_slopes if alibi_slopes is not None else lse  # a placeholder pointer when unused
    alibi_strides = (0 if alibi.shape[0] == 1 else alibi.stride(0), alibi.stride(1)) if alibi_slopes is not None else (0, 0)
    block_m, block_n, warps = _tile(q.dtype, groups * seq_q)
    row_blocks = -(-groups * seq_q // block_m)
    kvcache_decode_kernel[(batch * kv_heads * row_blocks, num_splits)](
        q, k_cache, v_cache, table, total, leftpad if leftpad is not None else total, alibi, out, lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), table.stride(0), *alibi_strides,
        *out.stride(), *lse.stride(),
        kv_heads, groups, seq_q, page_size, head_dim, value_dim, num_splits,
        scale, softcap or 1.0, max(window_within(left, reach), 0), max(window_within(right, reach), 0),
        BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=padded_head_dim(head_dim), BLOCK_DV=padded_head_dim(value_dim),
        WINDOW_LEFT=left >= 0, WINDOW_RIGHT=right >= 0, SOFTCAP=softcap is not None,
        ALIBI=alibi_slopes is not None, LEFTPAD=leftpad is not None, DOT_PRECISION=dot_precision(q.dtype),
        ONE_PAGE_TILES=contiguous or page_size % block_n == 0, num_warps=warps,
    )
    return out, lse
