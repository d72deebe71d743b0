"""FlashAttention-2 backward in Triton: a dQ pass, then a dK/dV pass; 7 tile matmuls per (query tile,
key tile) pair in all (9 in float32, and in 16 bits when a mask or slope gradient is asked for).

- dQ: one program per (query block, query head, batch). It first takes ``delta = rowsum(dO * O)`` (the
  softmax backward's row term; no matmul; in 16 bits from a first sweep over the scores, ``sum_j P * dP``,
  when a mask or slope gradient is asked for; in float32 a sweep adds ``delta_low = sum_j P (dP - delta)``:
  see the kernel), stores it for the dK/dV pass, then walks the visible key
  blocks: ``S = Q K^T``, ``P = exp(S - lse)``, ``dP = dO V^T``, ``dQ += dS K`` (3 matmuls). It also
  flags the rows whose probability is one-hot (exactly 1 on one key, as the forward computed it: the
  same expression, tile for tile): their score gradients are exactly 0, which ``P * (dP - delta)``
  would leave as rounding noise (delta sums the same products in another order), so both passes
  write 0 there. For a float32 slope gradient it also stores each row's mean distance under P, on
  which the dK/dV pass centers the distances (see :func:`attention_backward`).
- dK/dV: one program per (key block, key/value head, split of its query-head group, batch) holds its
  keys and values and walks the query blocks that can see them, on (keys, queries) tiles so that all
  4 matmuls (``S^T = K Q^T``, ``dP^T = V dO^T``, ``dV += P^T dO``, ``dK += dS^T Q``) have the held key
  block as M (wgmma on sm_90 needs M >= 64; float32 with IEEE products, no tensor cores, takes (queries,
  keys) tiles instead, whose ``S = Q K^T`` and ``dP = dO V^T`` are the dQ pass's products, bit for bit, on
  every device); it also writes the float mask's gradient and the ALiBi
  slopes' partial sums. With few KV heads the query-head group is split over programs (see
  :func:`dkdv_splits`) whose float32 partial dK/dV are summed in a fixed order.

Each output element is owned by one program, so dQ, dK and dV need no atomics and are deterministic.
The mask gradient of a mask broadcast over batch, heads or keys sums over programs: with atomic adds,
or, under ``torch.use_deterministic_algorithms(True)``, into a buffer widened along those program
dimensions that torch then sums in a fixed order. Dropout regenerates the forward's mask from the
same seed and absolute indices (see :func:`~.attention_tiles.dropout_keep`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import attention_launch as launch
from .attention_tiles import dropout_keep, keep_factor, key_range, program_coordinates, query_range, scores

# How far (relative to |lse| + 1) a one-hot row's P may sit below 1 in the 16-bit path: the forward's
# rounded scale * log2(e), its product, ln 2 and the product back, and the backward's S = qk * scale,
# half a float32 ulp each, with room to spare.
_ONE_HOT_ULPS = tl.constexpr(8 * 2.0**-24)
# Past this |lse| a row's float32 lse = max + log(row sum) keeps little or none of log(row sum) (none at
# float's lowest value, which a float mask of Hugging Face's hides whole rows with): with a float mask
# such rows take P = exp(S - lse) / c, c their sum of exp(S - lse) (see the dQ pass). float32 gradients
# (IEEE products) take it on every row: lse's rounding, half an ulp of |lse|, is a same-signed relative
# error in every P of its row, which float32's bound does not leave room for once |lse| is a few tens
# (scores of 1000 and 999.5: dV 12x the bound).
_FAR_LSE = tl.constexpr(256.0)


@triton.jit
def attention_dkdv_kernel(
    Q, K, V, Mask, KeyLengths, Alibi, CuQ, CuK, DOut, Lse, LseFix, Delta, DeltaLow, OneHot, DistMean, DK, DV, DMask, DAlibi,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    stride_dks, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvs, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_xb, stride_xh, stride_xk, stride_xm, stride_xn, stride_xblock,
    stride_yb, stride_yh, stride_yblock,
    n_heads, groups, splits, seq_q, seq_k, head_dim, value_head_dim,
    scale, softcap, window_left, window_right, dropout_p, seed, tune_key,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, MASK: tl.constexpr, KEY_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, FLAT_GRID: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASK_GRAD: tl.constexpr, MASK_SUM_ROWS: tl.constexpr, MASK_SUM_COLS: tl.constexpr, ALIBI_GRAD: tl.constexpr,
    ALIBI_CENTER: tl.constexpr,
):
    RENORM: tl.constexpr = MASK == 2 or DOT_PRECISION == "ieee"  # rows renormalized (see _FAR_LSE)
    # score tiles (queries, keys) in float32 (IEEE products), as the dQ pass's; (keys, queries) else
    QUERY_MAJOR: tl.constexpr = DOT_PRECISION == "ieee"
    # slot: (key/value head, split of its query-head group)
    block, slot, b = program_coordinates(seq_k, BLOCK_N, n_heads // groups * splits, FLAT_GRID)
    n0 = block * BLOCK_N
    hk = slot // splits
    split = slot % splits
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    q_start = 0
    k_start = 0
    if VARLEN:
        q_start = tl.load(CuQ + b).to(tl.int64)
        k_start = tl.load(CuK + b).to(tl.int64)
        seq_q = (tl.load(CuQ + b + 1) - q_start).to(tl.int32)
        seq_k = (tl.load(CuK + b + 1) - k_start).to(tl.int32)
    key_length = seq_k
    if KEY_LENGTHS:
        key_length = tl.load(KeyLengths + b).to(tl.int32)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d64, dv64 = offs_d[None, :].to(tl.int64), offs_dv[None, :].to(tl.int64)  # a feature stride may be large
    # Tiles are (keys, queries): every matmul has M = BLOCK_N, the key block this program holds
    # (wgmma needs M >= 64; BLOCK_M, the streamed query block, stays small).
    cols = offs_n[:, None]  # the program's keys: rows of k, v, dk, dv and of the score tiles
    k = tl.load(
        K + b64 * stride_kb + hk64 * stride_kh + (k_start + cols.to(tl.int64)) * stride_kn + d64 * stride_kd,
        mask=(cols < seq_k) & (offs_d[None, :] < head_dim), other=0.0,
    )
    # V's rows past key_length (padding that may hold NaN) load as 0, so dP = dO V^T is 0 there and
    # P = 0 keeps dS 0 (K's rows there only meet dS = 0: their scores are masked).
    v = tl.load(
        V + b64 * stride_vb + hk64 * stride_vh + (k_start + cols.to(tl.int64)) * stride_vn + dv64 * stride_vd,
        mask=(cols < key_length) & (offs_dv[None, :] < value_head_dim), other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    keep_scale = keep_factor(dropout_p)
    lo, hi = query_range(
        n0, seq_q, seq_k, window_left, window_right, key_length,
        BLOCK_M, BLOCK_N, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
    )
    per_split = groups // splits
    for g in range(split * per_split, (split + 1) * per_split):
        h = hk * groups + g
        h64 = h.to(tl.int64)
        slope = 0.0
        if ALIBI:
            slope = tl.load(Alibi + b64 * stride_ab + h64 * stride_ah).to(tl.float32)
        mask_base = Mask
        if MASK != 0:
            mask_base = Mask + b64 * stride_mb + h64 * stride_mh
        q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
        do_base = DOut + b64 * stride_gb + h64 * stride_gh + q_start * stride_gm
        stat_offset = b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
        stream = b * n_heads + h
        slope_grad = tl.zeros([BLOCK_N], tl.float32)
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < seq_q
            q = tl.load(
                q_base + offs_m[:, None].to(tl.int64) * stride_qm + d64 * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0,
            )
            do = tl.load(
                do_base + offs_m[:, None].to(tl.int64) * stride_gm + dv64 * stride_gd,
                mask=row_ok[:, None] & (offs_dv[None, :] < value_head_dim), other=0.0,
            )
            stats = stat_offset + offs_m.to(tl.int64) * stride_lm
            lse = tl.load(Lse + stats, mask=row_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)  # a row that sees nothing: every score is -inf
            delta = tl.load(Delta + stats, mask=row_ok, other=0.0)
            if QUERY_MAJOR:
                delta_low = tl.load(DeltaLow + stats, mask=row_ok, other=0.0)
            one_hot = tl.load(OneHot + stats, mask=row_ok, other=0) != 0
            if ALIBI_CENTER:
                dist_mean = tl.load(DistMean + stats, mask=row_ok, other=0.0)
            if QUERY_MAJOR:
                # float32 gradients are held to float32 rounding: the dQ pass's expressions, bit for bit, for
                # the scores (P the forward's: rows summing to 1 as its lse says) and for dP below (delta_low
                # holds that pass's: see there). No tensor cores here, hence no wgmma to lose.
                qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            else:
                qk = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
            s, t = scores(
                qk, _per_query(offs_m, QUERY_MAJOR), _per_key(offs_n, QUERY_MAJOR), seq_q, seq_k, scale, softcap,
                slope, mask_base, stride_mm, stride_mn, window_left, window_right, key_length,
                SOFTCAP, ALIBI, MASK, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
            )
            if RENORM:  # log of the row's sum of exp(S - lse) (the dQ pass)
                fix = tl.load(LseFix + stats, mask=row_ok, other=0.0)
                p = tl.exp((s - _per_query(lse, QUERY_MAJOR)) - _per_query(fix, QUERY_MAJOR))
            else:
                p = tl.exp(s - _per_query(lse, QUERY_MAJOR))
            if QUERY_MAJOR:
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            else:
                dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            p_kept = p
            if DROPOUT:
                keep = dropout_keep(seed, stream, offs_m[:, None], n0, dropout_p, BLOCK_N)
                if not QUERY_MAJOR:
                    keep = tl.trans(keep)
                p_kept = tl.where(keep, p * keep_scale, 0.0)
                dp = tl.where(keep, dp * keep_scale, 0.0)
            if QUERY_MAJOR:
                dv += tl.dot(tl.trans(p_kept), do, input_precision=DOT_PRECISION)
                # delta as a pair (see the dQ pass)
                ds = p * ((dp - delta[:, None]) - delta_low[:, None])
            else:
                dv += tl.dot(p_kept.to(do.dtype), do, input_precision=DOT_PRECISION)
                ds = p * (dp - delta[None, :])
            # gradient of the final (biased, masked) score; 0 on a row that sees one key (see the dQ pass)
            ds = tl.where(_per_query(one_hot, QUERY_MAJOR), 0.0, ds)
            if MASK_GRAD:
                _add_mask_grad(
                    DMask + b64 * stride_xb + h64 * stride_xh + slot.to(tl.int64) * stride_xk
                    + block.to(tl.int64) * stride_xblock,
                    tl.trans(ds) if QUERY_MAJOR else ds, offs_m, offs_n, seq_q, seq_k, stride_xm, stride_xn,
                    MASK_SUM_ROWS, MASK_SUM_COLS,
                )
            if ALIBI_GRAD:
                distance = tl.abs(
                    _per_query(offs_m, QUERY_MAJOR) + (seq_k - seq_q) - _per_key(offs_n, QUERY_MAJOR)
                ).to(tl.float32)
                if ALIBI_CENTER:
                    # from the row's mean distance under P: the same sum (a row's dS sums to 0), but what the
                    # rounding of delta and of P leaves in a row's dS, nearly proportional to its P, is no
                    # longer multiplied by distances of up to the key range (see attention_backward)
                    distance = distance - _per_query(dist_mean, QUERY_MAJOR)
                slope_grad += tl.sum(ds * distance, 0 if QUERY_MAJOR else 1)
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            if QUERY_MAJOR:
                dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
            else:
                dk += tl.dot(ds.to(q.dtype), q, input_precision=DOT_PRECISION)
        if ALIBI_GRAD:  # d score / d slope = -|distance|; one partial sum per (batch, head, key block)
            tl.store(DAlibi + b64 * stride_yb + h64 * stride_yh + block.to(tl.int64) * stride_yblock,
                     -tl.sum(slope_grad, 0))

    dk = dk * scale
    key_ok = cols < seq_k
    split64 = split.to(tl.int64)
    tl.store(
        DK + split64 * stride_dks + b64 * stride_dkb + hk64 * stride_dkh + (k_start + cols.to(tl.int64)) * stride_dkn
        + d64 * stride_dkd,
        dk.to(DK.dtype.element_ty), mask=key_ok & (offs_d[None, :] < head_dim),
    )
    tl.store(
        DV + split64 * stride_dvs + b64 * stride_dvb + hk64 * stride_dvh + (k_start + cols.to(tl.int64)) * stride_dvn
        + dv64 * stride_dvd,
        dv.to(DV.dtype.element_ty), mask=key_ok & (offs_dv[None, :] < value_head_dim),
    )


@triton.jit
def _per_query(x, QUERY_MAJOR: tl.constexpr):
    """A per-query vector broadcast over the keys of a dK/dV score tile, in either orientation."""
    if QUERY_MAJOR:
        y = x[:, None]
    else:
        y = x[None, :]
    return y


@triton.jit
def _per_key(x, QUERY_MAJOR: tl.constexpr):
    """A per-key vector broadcast over the queries of a dK/dV score tile, in either orientation."""
    if QUERY_MAJOR:
        y = x[None, :]
    else:
        y = x[:, None]
    return y


@triton.jit
def _add_mask_grad(base, ds, offs_m, offs_n, seq_q, seq_k, stride_m, stride_n,
                   SUM_ROWS: tl.constexpr, SUM_COLS: tl.constexpr):
    """Adds a ``(BLOCK_N, BLOCK_M)`` (keys, queries) score-gradient tile to the mask gradient, summed
    first over the dims the mask broadcasts along within the tile (rows: queries, cols: keys)."""
    if SUM_ROWS and SUM_COLS:
        tl.atomic_add(base, tl.sum(tl.sum(ds, 1), 0))
    elif SUM_ROWS:
        tl.atomic_add(base + offs_n.to(tl.int64) * stride_n, tl.sum(ds, 1), mask=offs_n < seq_k)
    elif SUM_COLS:
        tl.atomic_add(base + offs_m.to(tl.int64) * stride_m, tl.sum(ds, 0), mask=offs_m < seq_q)
    else:
        offsets = offs_n[:, None].to(tl.int64) * stride_n + offs_m[None, :].to(tl.int64) * stride_m
        tl.atomic_add(base + offsets, ds, mask=(offs_n[:, None] < seq_k) & (offs_m[None, :] < seq_q))


@triton.jit
def _dq_scores(
    q, k_base, n0, rows, offs_d, seq_q, seq_k, head_dim, stride_kn, stride_kd, scale, softcap, slope,
    mask_base, stride_mm, stride_mn, window_left, window_right, key_length,
    BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, KEY_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The keys of a (BLOCK_M, BLOCK_N) tile of the dQ pass, their scores and the softcap's tanh."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = tl.load(
        k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :].to(tl.int64) * stride_kd,
        mask=(offs_n[:, None] < key_length) & (offs_d[None, :] < head_dim), other=0.0,
    )
    # the forward's expression: the same scores, bit for bit, so P is exactly 1 where the forward's was
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s, t = scores(
        qk, rows, offs_n[None, :], seq_q, seq_k, scale, softcap, slope, mask_base, stride_mm, stride_mn,
        window_left, window_right, key_length,
        SOFTCAP, ALIBI, MASK, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
    )
    return k, s, t


@triton.jit
def _dq_tile(
    q, do, lse, k_base, v_base, n0, rows, offs_d, offs_dv, seq_q, seq_k, head_dim, value_head_dim,
    stride_kn, stride_kd, stride_vn, stride_vd, scale, softcap, slope, mask_base, stride_mm, stride_mn,
    window_left, window_right, key_length, dropout_p, keep_scale, seed, stream,
    BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, KEY_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of the dQ pass: keys, ``P = exp(S - lse)`` (``c`` times it on the rows a
    float mask leaves with a large |lse|: see the kernel), ``dP`` (dropout applied) and the softcap's tanh."""
    k, s, t = _dq_scores(
        q, k_base, n0, rows, offs_d, seq_q, seq_k, head_dim, stride_kn, stride_kd, scale, softcap, slope,
        mask_base, stride_mm, stride_mn, window_left, window_right, key_length,
        BLOCK_N, SOFTCAP, ALIBI, MASK, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS, DOT_PRECISION,
    )
    offs_n = n0 + tl.arange(0, BLOCK_N)
    v = tl.load(
        v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :].to(tl.int64) * stride_vd,
        mask=(offs_n[:, None] < key_length) & (offs_dv[None, :] < value_head_dim), other=0.0,
    )
    p = tl.exp(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = dropout_keep(seed, stream, rows, n0, dropout_p, BLOCK_N)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    return k, p, dp, t


@triton.jit
def attention_dq_kernel(
    Q, K, V, Mask, KeyLengths, Alibi, CuQ, CuK, Out, DOut, Lse, LseFix, Delta, DeltaLow, OneHot, DQ, Sinks, DistMean,
    DAlibiRows,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_yb, stride_yh, stride_yblock,
    n_heads, groups, seq_q, seq_k, head_dim, value_head_dim,
    scale, softcap, window_left, window_right, dropout_p, seed, tune_key,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, MASK: tl.constexpr, KEY_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, FLAT_GRID: tl.constexpr, DOT_PRECISION: tl.constexpr, DELTA_FROM_SCORES: tl.constexpr,
    ALIBI_CENTER: tl.constexpr, SINKS: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    RENORM: tl.constexpr = MASK == 2 or DOT_PRECISION == "ieee"  # rows renormalized (see _FAR_LSE)
    q_block, h, b = program_coordinates(seq_q, BLOCK_M, n_heads, FLAT_GRID)
    m0 = q_block * BLOCK_M
    hk = h // groups
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    q_start = 0
    k_start = 0
    if VARLEN:
        q_start = tl.load(CuQ + b).to(tl.int64)
        k_start = tl.load(CuK + b).to(tl.int64)
        seq_q = (tl.load(CuQ + b + 1) - q_start).to(tl.int32)
        seq_k = (tl.load(CuK + b + 1) - k_start).to(tl.int32)
    key_length = seq_k
    if KEY_LENGTHS:
        key_length = tl.load(KeyLengths + b).to(tl.int32)
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + b64 * stride_ab + h64 * stride_ah).to(tl.float32)
    mask_base = Mask
    if MASK != 0:
        mask_base = Mask + b64 * stride_mb + h64 * stride_mh
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d64, dv64 = offs_d[None, :].to(tl.int64), offs_dv[None, :].to(tl.int64)  # a feature stride may be large
    rows = offs_m[:, None]
    row_ok = offs_m < seq_q
    q = tl.load(
        Q + b64 * stride_qb + h64 * stride_qh + (q_start + rows.to(tl.int64)) * stride_qm + d64 * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0,
    )
    do = tl.load(
        DOut + b64 * stride_gb + h64 * stride_gh + (q_start + rows.to(tl.int64)) * stride_gm
        + dv64 * stride_gd,
        mask=row_ok[:, None] & (offs_dv[None, :] < value_head_dim), other=0.0,
    )
    o = tl.load(
        Out + b64 * stride_ob + h64 * stride_oh + (q_start + rows.to(tl.int64)) * stride_om
        + dv64 * stride_od,
        mask=row_ok[:, None] & (offs_dv[None, :] < value_head_dim), other=0.0,
    )
    stat_offset = b64 * stride_lb + h64 * stride_lh + (q_start + offs_m.to(tl.int64)) * stride_lm
    lse = tl.load(Lse + stat_offset, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    keep_scale = keep_factor(dropout_p)
    stream = b * n_heads + h
    lo, hi = key_range(
        m0, seq_q, seq_k, window_left, window_right, key_length,
        BLOCK_M, BLOCK_N, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
    )
    if DELTA_FROM_SCORES:  # a first sweep: delta = sum_j P * dP, free of the stored output's rounding
        delta = tl.zeros([BLOCK_M], tl.float32)
        mass = tl.zeros([BLOCK_M], tl.float32)  # and sum_j P, for RENORM below
        for n0 in range(lo, hi, BLOCK_N):
            _, p, dp, _ = _dq_tile(
                q, do, lse, k_base, v_base, n0, rows, offs_d, offs_dv, seq_q, seq_k, head_dim, value_head_dim,
                stride_kn, stride_kd, stride_vn, stride_vd, scale, softcap, slope, mask_base, stride_mm, stride_mn,
                window_left, window_right, key_length, dropout_p, keep_scale, seed, stream,
                BLOCK_N, SOFTCAP, ALIBI, MASK, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS, DROPOUT, DOT_PRECISION,
            )
            delta += tl.sum(p * dp, 1)
            if RENORM:
                mass += tl.sum(p, 1)
    else:
        # FlashAttention-2's delta = rowsum(dO * O), the softmax backward's row term (0 where O is: a row
        # that sees nothing); with sinks, O and lse include the sink, which has no value and so no dP
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    # 1 / c, P = exp(S - lse) / c: 1 but on the rows renormalized (see _FAR_LSE)
    inverse = tl.full([BLOCK_M], 1.0, tl.float32)
    if RENORM:
        # float32's lse = max + log(row sum) keeps none of log(row sum) at |max| near float's lowest value
        # (a float mask of Hugging Face's hiding the row whole: every score is that value), so exp(S - lse)
        # would be 1 on each key, not 1 / n. Rows with a large |lse| take P = exp(S - lse) / c instead, c
        # their sum of exp(S - lse) (at most 1 each: lse rounds from max up): the dK/dV pass with
        # fix = log c (0 on every other row: bit for bit as without it); this pass takes the loops'
        # exp(S - lse) as they are and 1 / c out of their row sums (delta from the scores, delta_low, the
        # peak, the mean distance; delta from the output is the softmax's already), and out of dS: in 16 bits
        # through the upstream gradient's row times 1 / c (dP then is), in float32 on dQ after the loop (dP
        # stays delta_low's). float32: every row (see _FAR_LSE); lse = 0 is exact, as is a row that saw nothing.
        fix = tl.zeros([BLOCK_M], tl.float32)
        if DOT_PRECISION == "ieee":
            # float32: every row, and delta as a pair, delta + delta_low: delta = rowsum(dO * O), delta_low =
            # sum_j P (dP - delta) over this sweep's P and dP, which both passes compute bit for bit (the same
            # expressions). A key holding most of its row's weight has dS = P (dP - delta) with dP and delta
            # nearly equal: a rounding of delta that dP does not share (O's, P's row sum's, the sum's own) was
            # all of dS's error there (P 0.9998, the next key 8.5 below at scale 50: dK 5x, dQ 2.6x the
            # policy's bound); (dP - delta) - delta_low cancels it, dP - delta being exact there.
            mass = tl.zeros([BLOCK_M], tl.float32)
            rest = tl.zeros([BLOCK_M], tl.float32)
            for n0 in range(lo, hi, BLOCK_N):
                _, p, dp, _ = _dq_tile(
                    q, do, lse, k_base, v_base, n0, rows, offs_d, offs_dv, seq_q, seq_k, head_dim, value_head_dim,
                    stride_kn, stride_kd, stride_vn, stride_vd, scale, softcap, slope, mask_base, stride_mm,
                    stride_mn, window_left, window_right, key_length, dropout_p, keep_scale, seed, stream,
                    BLOCK_N, SOFTCAP, ALIBI, MASK, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS, DROPOUT,
                    DOT_PRECISION,
                )
                mass += tl.sum(p, 1)
                rest += tl.sum(p * (dp - delta[:, None]), 1)
            if HAS_SINKS:  # lse has the sink's term: a key with no value (dP = 0)
                p_sink = tl.exp(tl.load(Sinks + h).to(tl.float32) - lse)
                mass += p_sink
                rest -= p_sink * delta
            far = row_ok & (lse != 0.0)
            fix = tl.where(far, tl.log(tl.where(far, mass, 1.0)), 0.0)
            inverse = tl.exp(-fix)
            delta_low = rest * inverse
            tl.store(DeltaLow + stat_offset, delta_low, mask=row_ok)  # for the dK/dV pass
        else:
            far = row_ok & (tl.abs(lse) > _FAR_LSE)
            if tl.max(far.to(tl.int32), 0) > 0:
                if not DELTA_FROM_SCORES:  # (else the delta sweep took the row sums)
                    mass = tl.zeros([BLOCK_M], tl.float32)
                    for n0 in range(lo, hi, BLOCK_N):
                        _, s, _ = _dq_scores(
                            q, k_base, n0, rows, offs_d, seq_q, seq_k, head_dim, stride_kn, stride_kd, scale,
                            softcap, slope, mask_base, stride_mm, stride_mn, window_left, window_right, key_length,
                            BLOCK_N, SOFTCAP, ALIBI, MASK, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
                            DOT_PRECISION,
                        )
                        mass += tl.sum(tl.exp(s - lse[:, None]), 1)
                if HAS_SINKS:  # lse has the sink's term
                    mass += tl.exp(tl.load(Sinks + h).to(tl.float32) - lse)
                fix = tl.where(far, tl.log(tl.where(far, mass, 1.0)), 0.0)
                inverse = tl.exp(-fix)
                if DELTA_FROM_SCORES:
                    delta = delta * inverse
        tl.store(LseFix + stat_offset, fix, mask=row_ok)  # for the dK/dV pass
    tl.store(Delta + stat_offset, delta, mask=row_ok)  # for the dK/dV pass, which runs next
    if RENORM and DOT_PRECISION != "ieee":  # then dP and delta are 1 / c times theirs, dS = P (dP - delta)
        do = (do * inverse[:, None]).to(do.dtype)
        delta = delta * inverse
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    peak = tl.zeros([BLOCK_M], tl.float32)
    # sum_j P |distance|, the row's mean distance (P sums to 1 without a sink): the dK/dV pass centers the
    # slope gradient's distances on it (see attention_backward)
    dist_mean = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        k, p, dp, t = _dq_tile(
            q, do, lse, k_base, v_base, n0, rows, offs_d, offs_dv, seq_q, seq_k, head_dim, value_head_dim,
            stride_kn, stride_kd, stride_vn, stride_vd, scale, softcap, slope, mask_base, stride_mm, stride_mn,
            window_left, window_right, key_length, dropout_p, keep_scale, seed, stream,
            BLOCK_N, SOFTCAP, ALIBI, MASK, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS, DROPOUT, DOT_PRECISION,
        )
        peak = tl.maximum(peak, tl.max(p, 1))
        if ALIBI_CENTER:
            dist_mean += tl.sum(p * tl.abs(rows + (seq_k - seq_q) - (n0 + tl.arange(0, BLOCK_N))[None, :]), 1)
        if DOT_PRECISION == "ieee":
            ds = p * ((dp - delta[:, None]) - delta_low[:, None])
        else:
            ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    if RENORM:
        # 1 / c read back, not held past the loop (registers): this program wrote it, other threads of it
        tl.debug_barrier()
        inverse = tl.exp(-tl.load(LseFix + stat_offset, mask=row_ok, other=0.0))
        peak = peak * inverse
        if DOT_PRECISION == "ieee":  # (the loop's dS is c times P's: dO was not scaled, for delta_low's dP)
            dq = dq * inverse[:, None]
        if ALIBI_CENTER:
            dist_mean = dist_mean * inverse
    # A row whose probability is all on one key (it sees one key, or the rest underflow) has a constant
    # softmax: its score gradients are exactly 0. dS = P * (dP - delta) would leave that key's dP minus
    # the same sum taken in another order (delta): rounding noise where the gradient is exactly 0.
    if DOT_PRECISION == "ieee":  # the forward's expression, renormalized (c = 1 on such a row): exactly 1 there
        one_hot = peak == 1.0
    else:
        # In 16 bits the forward works in log2 units (scale * log2(e) in one multiply, lse converted back
        # with ln 2), so P = exp(S - lse) of a one-hot row lands a few float32 ulps of |lse| from 1 (an
        # H200 run: float16 dK 1.3e-6 where it is 0). A row this close to 1 has at most that fraction of
        # its weight elsewhere: its exact dS is below the rounding of dP - delta. (lse loaded again: held
        # past the loop, it made an sm_80 tile spill.) Rows renormalized by c (a float mask) are within
        # ulps of 1 + |log c|. A row that saw no key has P = 0: not one-hot.
        size = tl.abs(tl.load(Lse + stat_offset, mask=row_ok, other=0.0))
        if MASK == 2:
            size = tl.where(size > _FAR_LSE, tl.abs(tl.log(inverse)), size)
        one_hot = (peak >= 1.0 - (size + 1.0) * _ONE_HOT_ULPS) & (peak > 0.0)
    tl.store(OneHot + stat_offset, one_hot.to(tl.uint8), mask=row_ok)  # for the dK/dV pass
    if ALIBI_CENTER:
        if SINKS:
            # With a sink a row's dS over its keys sums to p_sink * delta, not 0, and its P to 1 - p_sink (the
            # mean distance divides by that). Centering the distances on the mean c took c * p_sink * delta
            # from the row's sum: given back here, one partial sum per (batch, head, query block). lse has
            # the sink.
            p_sink = tl.exp(tl.load(Sinks + h).to(tl.float32) - lse)
            if RENORM:
                p_sink = p_sink * inverse
            mass = 1.0 - p_sink
            if DOT_PRECISION == "ieee":  # delta as a pair (see above)
                delta = delta + delta_low
            dist_mean = tl.where(mass > 0.0, dist_mean / tl.where(mass > 0.0, mass, 1.0), 0.0)
            term = tl.where(row_ok & ~one_hot, dist_mean * p_sink * delta, 0.0)
            tl.store(DAlibiRows + b64 * stride_yb + h64 * stride_yh + q_block.to(tl.int64) * stride_yblock,
                     -tl.sum(term, 0))
        tl.store(DistMean + stat_offset, dist_mean, mask=row_ok)  # for the dK/dV pass
    dq = tl.where(one_hot[:, None], 0.0, dq * scale)
    tl.store(
        DQ + b64 * stride_dqb + h64 * stride_dqh + (q_start + rows.to(tl.int64)) * stride_dqm
        + d64 * stride_dqd,
        dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < head_dim),
    )


# The slope partials are zeroed before each candidate the autotuner runs, as the mask gradient's
# accumulator: candidates of different block sizes write different numbers of block slots, and a slot that
# only a smaller candidate wrote would otherwise add its sum to the final launch's.
DKDV_ZEROED, DQ_ZEROED = ["DMask", "DAlibi"], ["DAlibiRows"]
_TUNED_DKDV = launch.autotuned(
    attention_dkdv_kernel, "backward_dkdv", extra_key=["MASK_GRAD", "ALIBI_GRAD", "ALIBI_CENTER", "splits"],
    reset_to_zero=DKDV_ZEROED,
)
_TUNED_DQ = launch.autotuned(
    attention_dq_kernel, "backward_dq", extra_key=["DELTA_FROM_SCORES", "ALIBI_CENTER", "SINKS"],
    reset_to_zero=DQ_ZEROED,
)


def _mask_grad_buffer(problem: launch.Problem, deterministic: bool, splits: int, block_n: int
                      ) -> tuple[torch.Tensor, dict, tuple[int, ...]]:
    """A float32 buffer the dK/dV pass adds the mask gradient into, its strides for the kernel, and the
    dims torch sums afterwards. Broadcast dims summed across programs are widened to one slot per
    program when ``deterministic`` (so every slot has one writer, ``block_n`` keys per key block); else
    programs add atomically."""
    mask = problem.mask
    mb, mh, ml, ms = mask.shape
    n_blocks = triton.cdiv(problem.max_seqlen_k, block_n)
    slots = problem.kv_heads * splits  # programs per key block and sequence
    wide_b = deterministic and mb == 1 and problem.batch > 1
    wide_kv = deterministic and mh == 1 and slots > 1
    wide_blocks = deterministic and ms == 1 and n_blocks > 1
    shape = (problem.batch if wide_b else mb, slots if wide_kv else mh, ml, ms, n_blocks if wide_blocks else 1)
    buffer = torch.zeros(shape, dtype=torch.float32, device=mask.device)
    sb, sh, sm, sn, sblock = buffer.stride()
    strides = {
        "stride_xb": sb if (wide_b or mb > 1) else 0,
        "stride_xh": sh if mh > 1 else 0,
        "stride_xk": sh if wide_kv else 0,
        "stride_xm": sm if ml > 1 else 0,
        "stride_xn": sn if ms > 1 else 0,
        "stride_xblock": sblock if wide_blocks else 0,
    }
    summed = tuple(d for d, wide in ((0, wide_b), (1, wide_kv), (4, True)) if wide)
    return buffer, strides, summed


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def dkdv_splits(problem: launch.Problem, block_n: int, sm_count: int) -> int:
    """How many programs share each key block's query-head group (a divisor of the group size): enough
    for about two programs per SM when key blocks x KV heads x batch alone would leave SMs idle (few KV
    heads, short keys). Their float32 partial dK/dV are summed in a fixed order afterwards."""
    groups = problem.heads // problem.kv_heads
    programs = triton.cdiv(problem.max_seqlen_k, block_n) * problem.kv_heads * problem.batch
    wanted = triton.cdiv(2 * sm_count, max(programs, 1))
    return max(d for d in range(1, groups + 1) if groups % d == 0 and d <= wanted)


def attention_backward(
    problem: launch.Problem, dout, lse, dq, dk, dv, need_mask_grad: bool, need_alibi_grad: bool,
    need_sinks_grad: bool = False, *, out: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """Writes ``dq``, ``dk``, ``dv`` (laid out like q, k, v) from the forward's ``out`` and ``lse``;
    returns the float32 gradients of the mask (its broadcast shape), of the ALiBi slopes (their shape)
    and of the sinks ``(Hq,)`` when asked for, else None. With sinks, ``out`` and ``lse`` include the
    sink, so ``delta`` gives the sink-inclusive probabilities to both passes; the sink's own gradient,
    ``-sum p_sink * delta``, is reduced here."""
    delta = torch.empty_like(lse)  # written by the dQ pass, with the rows whose probability is one-hot
    one_hot = torch.empty(lse.shape, dtype=torch.uint8, device=lse.device)
    shared = problem.shared_args() | {"DOut": dout, "Lse": lse, "Delta": delta, "OneHot": one_hot}
    # float32 (IEEE products) holds delta as a pair, delta + delta_low (see the dQ pass)
    delta_low = torch.empty_like(lse) if shared["DOT_PRECISION"] == "ieee" else None
    shared["DeltaLow"] = delta_low
    # and, with a float mask, the log of each row's sum of exp(S - lse) where lse lost it (see the dQ pass)
    renormalized = shared["MASK"] == 2 or shared["DOT_PRECISION"] == "ieee"
    shared["LseFix"] = torch.empty_like(lse) if renormalized else None
    shared |= dict(zip(("stride_gb", "stride_gh", "stride_gm", "stride_gd"), problem.rows(dout)))
    shared |= dict(zip(("stride_lb", "stride_lh", "stride_lm"), problem.row_stats(lse)))

    need_mask_grad = need_mask_grad and problem.mask is not None
    need_alibi_grad = need_alibi_grad and problem.alibi is not None
    # A mask or slope gradient sums score gradients over keys, where delta's error does not average out:
    # with 16-bit inputs delta comes from the scores then, not from the output stored in 16 bits (two
    # more matmuls per tile; float32's stored output is precise enough, measured by the shared suite)
    from_scores = (need_mask_grad or need_alibi_grad) and problem.q.dtype != torch.float32
    # The float32 slope gradient, -sum over rows and keys of dS * |distance|, is summed against distances
    # centered on each row's mean distance under P, which the dQ pass stores: exact, as a row's dS sums to 0
    # (with a sink, to p_sink * delta, which the dQ pass adds back), and robust where the plain sum is not.
    # A row's dS comes with an error nearly proportional to its P (delta's rounding; P's row sum is off 1 by
    # lse's), which the plain sum multiplies by sum_j P |distance|, up to the key range: float32 slope
    # gradients failed DESIGN.md's policy on 5.5-8.5% of random slope draws (tests/test_triton_attention.py::
    # test_varlen; the cpu backend centers likewise). 16-bit inputs keep the plain sum: their policy bound
    # is 16-bit rounding, and the running mean made sm_80's dQ kernel spill (bfloat16, head dim 128, every
    # feature: 17-23 spill stores).
    center = need_alibi_grad and problem.q.dtype == torch.float32
    dist_mean = torch.empty_like(lse) if center else None
    dalibi = dalibi_rows = None
    if need_alibi_grad:
        # one partial per (batch, head, key block) from the dK/dV pass (every tile's key block is a multiple
        # of 16) and, centered with sinks, one per query block from the dQ pass (so are query blocks)
        dalibi = torch.zeros(problem.batch, problem.heads, triton.cdiv(problem.max_seqlen_k, 16),
                             dtype=torch.float32, device=problem.q.device)
        if center and problem.sinks is not None:
            dalibi_rows = torch.zeros(problem.batch, problem.heads, triton.cdiv(problem.max_seqlen_q, 16),
                                      dtype=torch.float32, device=problem.q.device)
    dq_args = shared | {"DQ": dq, "Out": out, "DELTA_FROM_SCORES": from_scores, "ALIBI_CENTER": center,
                        "Sinks": problem.sinks, "SINKS": dalibi_rows is not None,
                        "HAS_SINKS": problem.sinks is not None, "DistMean": dist_mean,
                        "DAlibiRows": dalibi_rows}
    dq_args |= dict(zip(("stride_yb", "stride_yh", "stride_yblock"),
                        dalibi_rows.stride() if dalibi_rows is not None else (0, 0, 0)))
    dq_args |= dict(zip(("stride_ob", "stride_oh", "stride_om", "stride_od"), problem.rows(out)))
    dq_args |= dict(zip(("stride_dqb", "stride_dqh", "stride_dqm", "stride_dqd"), problem.rows(dq)))
    launch.run(attention_dq_kernel, _TUNED_DQ, "backward_dq", problem, dq_args)

    deterministic = torch.are_deterministic_algorithms_enabled()
    mask_shape = problem.mask.shape if problem.mask is not None else (1, 1, 1, 1)
    flags = {"MASK_GRAD": need_mask_grad, "MASK_SUM_ROWS": mask_shape[2] == 1, "MASK_SUM_COLS": mask_shape[3] == 1,
             "ALIBI_GRAD": need_alibi_grad, "ALIBI_CENTER": center}
    # the flags take part in the tile choice (a mask gradient prunes tiles that spill with it)
    block_n = launch.fixed_tile(attention_dkdv_kernel, "backward_dkdv", shared | flags).block_n
    splits = dkdv_splits(problem, block_n, _sm_count(problem.q.device))
    dmask, dmask_strides, dmask_summed = None, dict.fromkeys(
        ("stride_xb", "stride_xh", "stride_xk", "stride_xm", "stride_xn", "stride_xblock"), 0), ()
    if need_mask_grad:
        dmask, dmask_strides, dmask_summed = _mask_grad_buffer(problem, deterministic, splits, block_n)
    # split programs write float32 partials, one slice each (zeros: varlen leaves rows between sequences)
    partial = torch.zeros if problem.varlen else torch.empty
    dk_out, dv_out = (dk, dv) if splits == 1 else (partial((splits, *t.shape), dtype=torch.float32, device=t.device)
                                                   for t in (dk, dv))
    dkdv = shared | {"DK": dk_out, "DV": dv_out, "DMask": dmask, "DAlibi": dalibi, "DistMean": dist_mean,
                     "splits": splits, **dmask_strides}
    for name, t in (("dk", dk_out), ("dv", dv_out)):
        inner = t if splits == 1 else t[0]
        dkdv |= dict(zip((f"stride_{name}{c}" for c in "bhnd"), problem.rows(inner)))
        dkdv[f"stride_{name}s"] = 0 if splits == 1 else t.stride(0)
    dkdv |= dict(zip(("stride_yb", "stride_yh", "stride_yblock"), dalibi.stride() if dalibi is not None else (0, 0, 0)))
    dkdv |= flags
    launch.run(attention_dkdv_kernel, _TUNED_DKDV, "backward_dkdv", problem, dkdv)
    if splits > 1:  # a fixed-order sum: deterministic
        dk.copy_(dk_out.sum(0))
        dv.copy_(dv_out.sum(0))

    mask_grad = None
    if dmask is not None:
        mask_grad = dmask.sum(dim=dmask_summed, keepdim=True) if dmask_summed else dmask
        mask_grad = mask_grad.reshape(problem.mask.shape)
    slope_grad = None
    if dalibi is not None:
        slope_grad = dalibi.sum(-1) if dalibi_rows is None else dalibi.sum(-1) + dalibi_rows.sum(-1)
        if problem.alibi.shape[0] == 1:
            slope_grad = slope_grad.sum(0, keepdim=True)
    sink_grad = None
    if need_sinks_grad and problem.sinks is not None:
        sink_grad = _sink_gradient(problem, lse, delta if delta_low is None else delta + delta_low, shared["LseFix"])
    return mask_grad, slope_grad, sink_grad


def _sink_gradient(problem: launch.Problem, lse, delta, lse_fix) -> torch.Tensor:
    """``d sinks[h] = -sum over batch and rows of p_sink * delta``, ``p_sink = exp(sink - lse - fix)`` (a
    row whose lse is -inf saw nothing and had no sink: it contributes 0; ``fix``: the dQ pass's, with a
    float mask)."""
    heads_dim = 0 if problem.varlen else 1  # lse is (Hq, total) packed, (B, Hq, L) dense
    shape = [1] * lse.dim()
    shape[heads_dim] = -1
    sinks = problem.sinks.to(torch.float32).view(shape)
    p_sink = torch.exp(sinks - lse.masked_fill(torch.isneginf(lse), 0.0) - (0.0 if lse_fix is None else lse_fix))
    dims = [d for d in range(lse.dim()) if d != heads_dim]
    return -(p_sink * delta).sum(dims)
