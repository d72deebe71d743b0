"""FlashAttention-2 forward in Triton: online softmax over key tiles, output and log-sum-exp.

One program per (query block, head, batch). It walks only the key tiles its causal/window/key-length
rules can see, keeps a running row max and row sum in float32, and writes ``out`` (in the input dtype)
and ``lse`` (float32, ``-inf`` for a row that sees nothing; its output is 0). Learned sinks join each
row's denominator after the last tile (lse includes them). Dense and packed (varlen) inputs share the
kernel: a varlen program reads its sequence's bounds from ``cu_seqlens``.

Scores live in log2 units (``exp2``, with ``scale * log2(e)`` folded into the one multiply-add that
also subtracts the row maximum). Key tiles come in four loops (:func:`interior_range`): the window's
left-edge tiles check the left bound per element, the masked tiles at the end (diagonal, window right
edge) the right bound, the ragged last tile both; the interior tiles between them check nothing, so a
causal interior tile costs what a non-causal one does. Without softcap, ALiBi or a float mask the row maximum
is taken on the raw ``q . k`` (scaled once per row). float32 and float masks keep natural units (see the kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _interpreting_now
from . import attention_launch as launch
from .attention_tiles import (
    alibi_bias,
    dropout_keep,
    interior_range,
    key_bounds,
    key_range,
    keys_within,
    program_coordinates,
    scores,
    tanh,
    tanh_approx,
    tile_keys_within,
)

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# The GPU's tanh instruction for the softcap of 16-bit inputs; the interpreter (and float32) keep the exact one.
_HW_TANH = not _interpreting_now()


@triton.jit
def _exp(x, NATURAL: tl.constexpr):
    if NATURAL:
        return tl.exp(x)
    else:
        return tl.math.exp2(x)


@triton.jit
def tile_scores(
    s, rows, cols, n0, first, last, mask_base, stride_mm, stride_mn,
    seq_q, seq_k, qk_scale, log2_softcap, slope2, BLOCK_N: tl.constexpr,
    SIDES: tl.constexpr, WINDOW_LEFT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    MASK: tl.constexpr, FAST_TANH: tl.constexpr, NATURAL: tl.constexpr,
):
    """A tile's scores from ``s = q . k``, ``-inf`` where a key is hidden: in log2 units, in units of the
    positive factor :func:`_key_tiles` applies later (``softcap * log2(e)`` with a softcap, else the
    scale), so that the factor joins the row maximum once per row and the exponent's multiply-add
    (``slope2`` in those units too); ``NATURAL`` (a float mask in 16 bits): the final scores in natural
    units, as the backward's :func:`scores` computes them (``qk_scale``, ``log2_softcap``, ``slope2``
    then hold the scale, softcap and slope)."""
    if NATURAL:
        s = s * qk_scale
        if SOFTCAP:  # the backward's expression, tanh(s / softcap) * softcap
            if FAST_TANH:
                s = tanh_approx(s / log2_softcap) * log2_softcap
            else:
                s = tanh(s / log2_softcap) * log2_softcap
    elif SOFTCAP:  # softcap * tanh(qk * scale / softcap), times softcap * log2(e) later
        if FAST_TANH:
            s = tanh_approx(s * qk_scale)
        else:
            s = tanh(s * qk_scale)
    if ALIBI:
        s = s - alibi_bias(slope2, rows, cols, seq_k - seq_q)
    if MASK != 0:  # a float mask comes with NATURAL (the kernel's)
        m = tl.load(mask_base + rows.to(tl.int64) * stride_mm + cols.to(tl.int64) * stride_mn,
                    mask=(rows < seq_q) & (cols < seq_k), other=0)
        if MASK == 1:
            s = tl.where(m != 0, s, float("-inf"))
        else:
            s = s + m.to(tl.float32)
    if SIDES != 0:  # the row's key bounds (from key_bounds) the tile needs, one compare per element each
        if ALIBI or MASK != 0:  # the tile's key indices are live already: compare them directly
            s = tl.where(keys_within(cols, first, last, WINDOW_LEFT, SIDES), s, float("-inf"))
        else:
            s = tl.where(tile_keys_within(n0, first, last, BLOCK_N, WINDOW_LEFT, SIDES), s, float("-inf"))
    return s


@triton.jit
def _key_tiles(
    acc, row_max, row_sum, q, k_base, v_base, mask_base, lo, hi, rows, first, last, offs_d, offs_dv,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    seq_q, seq_k, head_dim, value_head_dim, qk_scale, log2_softcap, slope2, window_left, window_right, key_length,
    dropout_p, seed, stream,
    SIDES: tl.constexpr, RAGGED: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, WIDE_TILES: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, MASK: tl.constexpr, KEY_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FAST_TANH: tl.constexpr, NATURAL: tl.constexpr,
):
    """Online softmax over the key tiles ``[lo, hi)``; tiles with ``SIDES`` (see :func:`keys_within`)
    check those key bounds per element, the others are fully visible (only the user's mask, if any,
    hides keys there);
    ``RAGGED`` tiles may reach past ``seq_k`` and load their key rows under a bound.
    ``NATURAL``: natural-log units (float32: the backward's own score expression; see the kernel)."""
    # log2 scores, in units of a positive factor (see tile_scores), take it in the row maximum, once per row
    factor = qk_scale
    if SOFTCAP:
        factor = log2_softcap
    # Only then can a row have seen nothing but -inf, whose exponent base must stay finite.
    guard: tl.constexpr = SIDES != 0 or MASK != 0 or NATURAL
    offs_tile = tl.arange(0, BLOCK_N)[:, None]
    cols_d = offs_d[None, :]
    cols_dv = offs_dv[None, :]
    if WIDE_TILES:  # each term in 64 bits: a feature stride alone may be the large one
        offs_tile = offs_tile.to(tl.int64)
        cols_d = cols_d.to(tl.int64)
        cols_dv = cols_dv.to(tl.int64)
    k_offsets = offs_tile * stride_kn + cols_d * stride_kd
    v_offsets = offs_tile * stride_vn + cols_dv * stride_vd
    k_tile = k_base + tl.cast(lo, tl.int64) * stride_kn
    v_tile = v_base + tl.cast(lo, tl.int64) * stride_vn
    k_step = BLOCK_N * stride_kn
    v_step = BLOCK_N * stride_vn
    if WIDE_TILES:
        k_step = BLOCK_N * tl.cast(stride_kn, tl.int64)
        v_step = BLOCK_N * tl.cast(stride_vn, tl.int64)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        cols = offs_n[None, :]
        # a uniform tile base, advanced per tile, plus the loop-invariant offsets inside the tile
        k_ptrs = k_tile + k_offsets
        v_ptrs = v_tile + v_offsets
        # Masks built in constexpr branches: Triton 3.2's interpreter cannot OR a constexpr into a tensor.
        if RAGGED:  # (keys past key_length too: padding may hold anything, an uninitialized cache's NaN)
            k_mask = offs_n[:, None] < key_length
            v_mask = k_mask
            if not EVEN_D:
                k_mask = k_mask & (offs_d[None, :] < head_dim)
                v_mask = v_mask & (offs_dv[None, :] < value_head_dim)
        elif not EVEN_D:
            k_mask = offs_d[None, :] < head_dim
            v_mask = offs_dv[None, :] < value_head_dim
        if RAGGED or not EVEN_D:
            k = tl.load(k_ptrs, mask=k_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
        if DOT_PRECISION == "ieee":  # qk_scale, log2_softcap, slope2 hold scale, softcap, slope here
            s, _ = scores(
                tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), rows, cols, seq_q, seq_k, qk_scale,
                log2_softcap, slope2, mask_base, stride_mm, stride_mn, window_left, window_right, key_length,
                SOFTCAP, ALIBI, MASK, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
            )
        else:
            s = tile_scores(
                tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), rows, cols, n0, first, last, mask_base,
                stride_mm, stride_mn, seq_q, seq_k, qk_scale, log2_softcap, slope2, BLOCK_N,
                SIDES, WINDOW_LEFT, SOFTCAP, ALIBI, MASK, FAST_TANH, NATURAL,
            )
        if NATURAL:
            new_max = tl.maximum(row_max, tl.max(s, 1))
        else:
            new_max = tl.maximum(row_max, tl.max(s, 1) * factor)
        base = new_max
        if guard:  # exp2(-inf - 0) = 0, never NaN
            base = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = _exp(row_max - base, NATURAL)
        if DOT_PRECISION == "ieee":  # float32: the backward's tl.exp, bit for bit
            p = tl.exp(s - base[:, None])
        elif NATURAL:  # 16-bit: the difference scaled, as tl.exp does, without its denormal guards
            p = tl.math.exp2((s - base[:, None]) * _LOG2E)
        else:
            p = tl.math.exp2(s * factor - base[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)  # the softmax denominator is taken before dropout
        if DROPOUT:  # the kept values' 1 / (1 - p) is applied to the output once, at the end
            p = tl.where(dropout_keep(seed, stream, rows, n0, dropout_p, BLOCK_N), p, 0.0)
        if RAGGED or not EVEN_D:
            v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        row_max = new_max
        k_tile += k_step
        v_tile += v_step
    return acc, row_max, row_sum


@triton.jit
def attention_forward_kernel(
    Q, K, V, Mask, KeyLengths, Alibi, CuQ, CuK, Out, Lse, Sinks,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    n_heads, groups, seq_q, seq_k, head_dim, value_head_dim,
    scale, softcap, window_left, window_right, dropout_p, seed, tune_key,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, MASK: tl.constexpr, KEY_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, FLAT_GRID: tl.constexpr, DOT_PRECISION: tl.constexpr, SINKS: tl.constexpr, EVEN_D: tl.constexpr,
    FAST_TANH: tl.constexpr, WIDE_TILES: tl.constexpr,
):
    # float32 (IEEE products) keeps natural-log units and the shared `scores` expression: its backward
    # recomputes P = exp(S - lse) with them, and float32 gradients are held to float32 rounding, which
    # the log2 units' rounded constants (scale * log2(e), slope * log2(e)) would exceed by a
    # distance-proportional, same-signed error in P (2-3x the float32 reference's gradient error).
    # A float mask too, in every dtype: in log2 units its values below -2.4e38 (Hugging Face's masks hold
    # the dtype's lowest value) overflow to -inf, and a row they hide entirely would see nothing where
    # torch's is uniform over its keys.
    NATURAL: tl.constexpr = DOT_PRECISION == "ieee" or MASK == 2
    block, h, b = program_coordinates(seq_q, BLOCK_M, n_heads, FLAT_GRID)
    m0 = block * BLOCK_M
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
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(Alibi + b64 * stride_ab + h64 * stride_ah).to(tl.float32)
        if not NATURAL:
            slope2 = slope2 * _LOG2E
    mask_base = Mask
    if MASK != 0:
        mask_base = Mask + b64 * stride_mb + h64 * stride_mh
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m[:, None]
    q = tl.load(
        q_base + rows.to(tl.int64) * stride_qm + offs_d[None, :].to(tl.int64) * stride_qd,
        mask=(rows < seq_q) & (offs_d[None, :] < head_dim), other=0.0,
    )
    # log2 units: softcap's argument is qk * (scale / softcap), its result times softcap * log2(e)
    qk_scale = scale * _LOG2E
    log2_softcap = 0.0
    if NATURAL:
        qk_scale = scale
        log2_softcap = softcap
    elif SOFTCAP:
        qk_scale = scale / softcap
        log2_softcap = softcap * _LOG2E
    else:
        # the row maximum is taken on q . k in units of the scale, which must be positive: a negative
        # scale flips q (exactly) instead, a zero one becomes q = 0 in units of 1 (a hidden key's -inf
        # times 0 would be NaN; ALiBi's bias then stands alone)
        # (negated in float32, exactly: Triton's interpreters negated bfloat16's raw bits as integers)
        q = tl.where(scale < 0, (-q.to(tl.float32)).to(q.dtype), q)
        q = tl.where(scale == 0, tl.zeros_like(q), q)
        qk_scale = tl.where(scale == 0, 1.0, tl.abs(qk_scale))
    if ALIBI and not NATURAL:  # the slope in units of the deferred factor (tile_scores)
        if SOFTCAP:
            slope2 = slope2 / log2_softcap
        else:
            slope2 = slope2 / qk_scale
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    stream = b * n_heads + h
    lo, hi = key_range(
        m0, seq_q, seq_k, window_left, window_right, key_length,
        BLOCK_M, BLOCK_N, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
    )
    a, z, end = interior_range(
        m0, lo, hi, seq_q, seq_k, window_left, window_right, key_length,
        BLOCK_M, BLOCK_N, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
    )
    first, last = key_bounds(rows, seq_q, seq_k, window_left, window_right, key_length,
                             CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS)
    # Four loops, each compile-time specialized: the window's left-edge tiles [lo, a0) (the left bound
    # only), the interior [a, z) (no checks), the whole masked tiles [z, e) (diagonal, window right
    # edge: the right bound only, unbounded loads) and the rest [e, hi) (both bounds, bounded key rows:
    # the ragged last tile). When left-edge tiles [a0, a) are also cut by the right bound (a window
    # narrower than about a query block plus a key tile), the last loop takes every tile from a0 on.
    e = z + ((hi - z) // BLOCK_N) * BLOCK_N
    a0 = lo + tl.minimum((tl.maximum(end - lo, 0) // BLOCK_N) * BLOCK_N, a - lo)
    narrow = a0 < a
    a = tl.where(narrow, a0, a)
    z = tl.where(narrow, a0, z)
    e = tl.where(narrow, a0, e)
    for part in tl.static_range(4):
        if part == 0:
            start, stop = lo, a0
        elif part == 1:
            start, stop = a, z
        elif part == 2:
            start, stop = z, e
        else:
            start, stop = e, hi
        if part != 0 or WINDOW_LEFT:
            acc, row_max, row_sum = _key_tiles(
                acc, row_max, row_sum, q, k_base, v_base, mask_base, start, stop, rows, first, last, offs_d, offs_dv,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                seq_q, seq_k, head_dim, value_head_dim, qk_scale, log2_softcap, slope2, window_left, window_right,
                key_length, dropout_p, seed, stream,
                (2, 0, 1, 3)[part], part == 3, BLOCK_N, EVEN_D, WIDE_TILES, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT,
                SOFTCAP, ALIBI, MASK, KEY_LENGTHS, DROPOUT, DOT_PRECISION, FAST_TANH, NATURAL,
            )

    if SINKS:  # one more term exp(sink) in the denominator, with no value
        sink = tl.load(Sinks + h).to(tl.float32)
        if not NATURAL:
            sink = sink * _LOG2E
        new_max = tl.maximum(row_max, sink)
        base = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = _exp(row_max - base, NATURAL)
        row_sum = row_sum * alpha + _exp(sink - base, NATURAL)
        acc = acc * alpha[:, None]
        row_max = new_max
    seen = row_sum > 0
    inverse = 1.0 / tl.where(seen, row_sum, 1.0)
    if DROPOUT:
        # (divided, as before p = 1 was taken: one rounding, not two; 0 at p = 1, every weight dropped)
        inverse = tl.where(dropout_p < 1.0, inverse / tl.maximum(1.0 - dropout_p, 1e-30), 0.0)
    out = acc * inverse[:, None]
    if NATURAL:
        lse = tl.where(seen, row_max + tl.log(tl.where(seen, row_sum, 1.0)), float("-inf"))
    else:
        lse = tl.where(seen, (row_max + tl.math.log2(tl.where(seen, row_sum, 1.0))) * _LN2, float("-inf"))
    out_base = Out + b64 * stride_ob + h64 * stride_oh + q_start * stride_om
    tl.store(
        out_base + rows.to(tl.int64) * stride_om + offs_dv[None, :].to(tl.int64) * stride_od,
        out.to(Out.dtype.element_ty),
        mask=(rows < seq_q) & (offs_dv[None, :] < value_head_dim),
    )
    lse_base = Lse + b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
    tl.store(lse_base + offs_m.to(tl.int64) * stride_lm, lse, mask=offs_m < seq_q)


_TUNED = launch.autotuned(attention_forward_kernel, "forward")


def attention_forward(problem: launch.Problem, out, lse) -> None:
    """Writes ``out`` and ``lse`` (see :class:`~.attention_launch.Problem` for the layouts)."""
    args = problem.forward_args(out, lse)
    # head dims equal to their padded tile width need no column masks
    args["EVEN_D"] = args["BLOCK_D"] == args["head_dim"] and args["BLOCK_DV"] == args["value_head_dim"]
    args["FAST_TANH"] = _HW_TANH and problem.q.dtype != torch.float32
    # offsets inside a key tile in 32 bits unless a tile's span could pass 2**31 elements
    span = 512 * max(abs(args[name]) for name in ("stride_kn", "stride_kd", "stride_vn", "stride_vd"))
    args["WIDE_TILES"] = span >= 2**31
    launch.run(attention_forward_kernel, _TUNED, "forward", problem, args)
