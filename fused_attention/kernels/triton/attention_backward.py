"""FlashAttention-2 backward in Triton: a dQ pass, then a dK/dV pass.

- dQ: one program per (query block, query head, batch) walks the visible key blocks twice. The first
  sweep recomputes the row's statistics from its scores: ``lse_fix = log(sum_j exp(S - lse))`` (the
  stored lse's rounding, of |lse| magnitude, cancels) and ``delta = sum_j P * dP`` (the softmax
  backward's row term, as torch's softmax backward rounds it; FlashAttention-2's ``rowsum(dO * O)``
  carries the output's rounding, which leaves gradients that are exactly 0 -- a row with one visible
  key, a mask constant along the keys -- visibly nonzero). The second sweep accumulates dQ.
- dK/dV: one program per (key block, key/value head, batch) holds its keys and values and walks the
  query blocks (of every query head of its GQA group) that can see them, recomputing
  ``P = exp(S - lse - lse_fix)`` on (query, key) tiles built exactly as the dQ pass builds them, so that
  ``dS = P * (dP - delta)`` sums to 0 over a row as it should; it also writes the float mask's
  gradient and the ALiBi slopes' partial sums.

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
from .attention_tiles import dropout_keep, key_range, query_range, scores


@triton.jit
def attention_dkdv_kernel(
    Q, K, V, Mask, KeyLengths, Alibi, CuQ, CuK, DOut, Lse, Delta, LseFix, DK, DV, DMask, DAlibi,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_xb, stride_xh, stride_xk, stride_xm, stride_xn, stride_xblock,
    stride_yb, stride_yh, stride_yblock,
    n_heads, groups, seq_q, seq_k, head_dim, value_head_dim,
    scale, softcap, window_left, window_right, dropout_p, seed, tune_key,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, MASK: tl.constexpr, KEY_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASK_GRAD: tl.constexpr, MASK_SUM_ROWS: tl.constexpr, MASK_SUM_COLS: tl.constexpr, ALIBI_GRAD: tl.constexpr,
):
    block = tl.program_id(0)
    n0 = block * BLOCK_N
    hk = tl.program_id(1)
    b = tl.program_id(2)
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
    cols = offs_n[:, None]  # the program's keys, as rows of k, v, dk, dv
    key_cols = offs_n[None, :]  # and as columns of the score tiles
    k = tl.load(
        K + b64 * stride_kb + hk64 * stride_kh + (k_start + cols.to(tl.int64)) * stride_kn + offs_d[None, :] * stride_kd,
        mask=(cols < seq_k) & (offs_d[None, :] < head_dim), other=0.0,
    )
    v = tl.load(
        V + b64 * stride_vb + hk64 * stride_vh + (k_start + cols.to(tl.int64)) * stride_vn + offs_dv[None, :] * stride_vd,
        mask=(cols < seq_k) & (offs_dv[None, :] < value_head_dim), other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    keep_scale = 1.0 / (1.0 - dropout_p)
    lo, hi = query_range(
        n0, seq_q, seq_k, window_left, window_right, key_length,
        BLOCK_M, BLOCK_N, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
    )
    for g in range(groups):
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
            rows = offs_m[:, None]
            row_ok = offs_m < seq_q
            q = tl.load(
                q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0,
            )
            do = tl.load(
                do_base + offs_m[:, None].to(tl.int64) * stride_gm + offs_dv[None, :] * stride_gd,
                mask=row_ok[:, None] & (offs_dv[None, :] < value_head_dim), other=0.0,
            )
            lse = tl.load(Lse + stat_offset + offs_m.to(tl.int64) * stride_lm, mask=row_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)  # a row that sees nothing: every score is -inf
            delta = tl.load(Delta + stat_offset + offs_m.to(tl.int64) * stride_lm, mask=row_ok, other=0.0)
            # (BLOCK_M, BLOCK_N) tiles computed by the same expressions as the dQ pass: scores and dP
            # then agree bit for bit with those that gave lse_fix and delta, so a row's ds sums to 0
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            s, t = scores(
                qk, rows, key_cols, seq_q, seq_k, scale, softcap, slope, mask_base, stride_mm, stride_mn,
                window_left, window_right, key_length,
                SOFTCAP, ALIBI, MASK, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
            )
            lse_fix = tl.load(LseFix + stat_offset + offs_m.to(tl.int64) * stride_lm, mask=row_ok, other=0.0)
            p = tl.exp((s - lse[:, None]) - lse_fix[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            p_kept = p
            if DROPOUT:
                keep = dropout_keep(seed, stream, rows, key_cols, dropout_p)
                p_kept = tl.where(keep, p * keep_scale, 0.0)
                dp = tl.where(keep, dp * keep_scale, 0.0)
            dv += tl.dot(tl.trans(p_kept.to(do.dtype)), do, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])  # gradient of the final (biased, masked) score
            if MASK_GRAD:
                _add_mask_grad(
                    DMask + b64 * stride_xb + h64 * stride_xh + hk64 * stride_xk + block.to(tl.int64) * stride_xblock,
                    ds, offs_m, offs_n, seq_q, seq_k, stride_xm, stride_xn, MASK_SUM_ROWS, MASK_SUM_COLS,
                )
            if ALIBI_GRAD:
                slope_grad += tl.sum(ds * tl.abs(rows + (seq_k - seq_q) - key_cols).to(tl.float32), 0)
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        if ALIBI_GRAD:  # d score / d slope = -|distance|; one partial sum per (batch, head, key block)
            tl.store(DAlibi + b64 * stride_yb + h64 * stride_yh + block.to(tl.int64) * stride_yblock,
                     -tl.sum(slope_grad, 0))

    dk = dk * scale
    key_ok = cols < seq_k
    tl.store(
        DK + b64 * stride_dkb + hk64 * stride_dkh + (k_start + cols.to(tl.int64)) * stride_dkn
        + offs_d[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty), mask=key_ok & (offs_d[None, :] < head_dim),
    )
    tl.store(
        DV + b64 * stride_dvb + hk64 * stride_dvh + (k_start + cols.to(tl.int64)) * stride_dvn
        + offs_dv[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty), mask=key_ok & (offs_dv[None, :] < value_head_dim),
    )


@triton.jit
def _add_mask_grad(base, ds, offs_m, offs_n, seq_q, seq_k, stride_m, stride_n,
                   SUM_ROWS: tl.constexpr, SUM_COLS: tl.constexpr):
    """Adds a ``(BLOCK_M, BLOCK_N)`` score-gradient tile to the mask gradient, summed first over the
    dims the mask broadcasts along within the tile (rows: queries, cols: keys)."""
    if SUM_ROWS and SUM_COLS:
        tl.atomic_add(base, tl.sum(tl.sum(ds, 1), 0))
    elif SUM_ROWS:
        tl.atomic_add(base + offs_n.to(tl.int64) * stride_n, tl.sum(ds, 0), mask=offs_n < seq_k)
    elif SUM_COLS:
        tl.atomic_add(base + offs_m.to(tl.int64) * stride_m, tl.sum(ds, 1), mask=offs_m < seq_q)
    else:
        offsets = offs_m[:, None].to(tl.int64) * stride_m + offs_n[None, :].to(tl.int64) * stride_n
        tl.atomic_add(base + offsets, ds, mask=(offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k))


@triton.jit
def _dq_tile(
    q, do, lse, lse_fix, k_base, v_base, n0, rows, offs_d, offs_dv, seq_q, seq_k, head_dim, value_head_dim,
    stride_kn, stride_kd, stride_vn, stride_vd,
    scale, softcap, slope, mask_base, stride_mm, stride_mn, window_left, window_right, key_length,
    dropout_p, keep_scale, seed, stream,
    BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, KEY_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of the dQ pass: keys, ``P = exp(S - lse - lse_fix)`` (``lse_fix``
    0 in the first sweep), ``dP`` (dropout applied) and the softcap's tanh."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    cols = offs_n[None, :]
    k = tl.load(
        k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
        mask=(offs_n[:, None] < seq_k) & (offs_d[None, :] < head_dim), other=0.0,
    )
    v = tl.load(
        v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
        mask=(offs_n[:, None] < seq_k) & (offs_dv[None, :] < value_head_dim), other=0.0,
    )
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s, t = scores(
        qk, rows, cols, seq_q, seq_k, scale, softcap, slope, mask_base, stride_mm, stride_mn,
        window_left, window_right, key_length,
        SOFTCAP, ALIBI, MASK, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
    )
    p = tl.exp((s - lse[:, None]) - lse_fix[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = dropout_keep(seed, stream, rows, cols, dropout_p)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    return k, p, dp, t


@triton.jit
def attention_dq_kernel(
    Q, K, V, Mask, KeyLengths, Alibi, CuQ, CuK, DOut, Lse, Delta, LseFix, DQ, Sinks,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    n_heads, groups, seq_q, seq_k, head_dim, value_head_dim,
    scale, softcap, window_left, window_right, dropout_p, seed, tune_key,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, MASK: tl.constexpr, KEY_LENGTHS: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, SINKS: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
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
    rows = offs_m[:, None]
    row_ok = offs_m < seq_q
    q = tl.load(
        Q + b64 * stride_qb + h64 * stride_qh + (q_start + rows.to(tl.int64)) * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0,
    )
    do = tl.load(
        DOut + b64 * stride_gb + h64 * stride_gh + (q_start + rows.to(tl.int64)) * stride_gm
        + offs_dv[None, :] * stride_gd,
        mask=row_ok[:, None] & (offs_dv[None, :] < value_head_dim), other=0.0,
    )
    stat_offset = b64 * stride_lb + h64 * stride_lh + (q_start + offs_m.to(tl.int64)) * stride_lm
    lse = tl.load(Lse + stat_offset, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    keep_scale = 1.0 / (1.0 - dropout_p)
    stream = b * n_heads + h
    lo, hi = key_range(
        m0, seq_q, seq_k, window_left, window_right, key_length,
        BLOCK_M, BLOCK_N, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
    )
    # first sweep: the row's statistics from its recomputed scores (see the module docstring)
    lse_fix = tl.zeros([BLOCK_M], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    weighted = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        _, e, dp, _ = _dq_tile(
            q, do, lse, lse_fix, k_base, v_base, n0, rows, offs_d, offs_dv, seq_q, seq_k, head_dim,
            value_head_dim, stride_kn, stride_kd, stride_vn, stride_vd,
            scale, softcap, slope, mask_base, stride_mm, stride_mn, window_left, window_right, key_length,
            dropout_p, keep_scale, seed, stream,
            BLOCK_N, SOFTCAP, ALIBI, MASK, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS, DROPOUT, DOT_PRECISION,
        )
        total += tl.sum(e, 1)
        weighted += tl.sum(e * dp, 1)
    if SINKS:  # the lse includes the sink: so does the row's total (the sink has no value, so no dP)
        sink = tl.load(Sinks + h).to(tl.float32)
        total += tl.exp(sink - tl.where(row_ok, lse, sink))  # rows past the end: exp(0), never inf
    seen = total > 0
    lse_fix = tl.where(seen, tl.log(tl.where(seen, total, 1.0)), 0.0)
    delta = tl.where(seen, weighted / tl.where(seen, total, 1.0), 0.0)
    tl.store(LseFix + stat_offset, lse_fix, mask=row_ok)  # for the dK/dV pass, which runs next
    tl.store(Delta + stat_offset, delta, mask=row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        k, p, dp, t = _dq_tile(
            q, do, lse, lse_fix, k_base, v_base, n0, rows, offs_d, offs_dv, seq_q, seq_k, head_dim,
            value_head_dim, stride_kn, stride_kd, stride_vn, stride_vd,
            scale, softcap, slope, mask_base, stride_mm, stride_mn, window_left, window_right, key_length,
            dropout_p, keep_scale, seed, stream,
            BLOCK_N, SOFTCAP, ALIBI, MASK, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS, DROPOUT, DOT_PRECISION,
        )
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * scale
    tl.store(
        DQ + b64 * stride_dqb + h64 * stride_dqh + (q_start + rows.to(tl.int64)) * stride_dqm
        + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < head_dim),
    )


_TUNED_DKDV = launch.autotuned(
    attention_dkdv_kernel, "backward_dkdv", extra_key=["MASK_GRAD", "ALIBI_GRAD"], reset_to_zero=["DMask"]
)
_TUNED_DQ = launch.autotuned(attention_dq_kernel, "backward_dq")


def _mask_grad_buffer(problem: launch.Problem, deterministic: bool) -> tuple[torch.Tensor, dict, tuple[int, ...]]:
    """A float32 buffer the dK/dV pass adds the mask gradient into, its strides for the kernel, and the
    dims torch sums afterwards. Broadcast dims summed across programs are widened to one slot per
    program when ``deterministic`` (so every slot has one writer); else programs add atomically."""
    mask = problem.mask
    mb, mh, ml, ms = mask.shape
    block_n = launch.fixed_tile(attention_dkdv_kernel, "backward_dkdv", problem.shared_args()).block_n
    n_blocks = triton.cdiv(problem.max_seqlen_k, block_n)
    wide_b = deterministic and mb == 1 and problem.batch > 1
    wide_kv = deterministic and mh == 1 and problem.kv_heads > 1
    wide_blocks = deterministic and ms == 1 and n_blocks > 1
    shape = (problem.batch if wide_b else mb, problem.kv_heads if wide_kv else mh, ml, ms,
             n_blocks if wide_blocks else 1)
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


def attention_backward(
    problem: launch.Problem, dout, lse, dq, dk, dv, need_mask_grad: bool, need_alibi_grad: bool,
    need_sinks_grad: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Writes ``dq``, ``dk``, ``dv`` (laid out like q, k, v); returns the float32 gradients of the mask
    (its broadcast shape), of the ALiBi slopes (their shape) and of the sinks ``(Hq,)`` when asked for,
    else None. With sinks the dQ pass's row totals include the sink, so its ``delta`` and ``lse_fix``
    give the sink-inclusive probabilities to both passes; the sink's own gradient,
    ``-sum p_sink * delta``, is reduced here from those row statistics."""
    delta, lse_fix = torch.empty_like(lse), torch.empty_like(lse)  # written by the dQ pass
    dout_strides = problem.rows(dout)
    shared = problem.shared_args() | {"DOut": dout, "Lse": lse, "Delta": delta, "LseFix": lse_fix}
    shared |= dict(zip(("stride_gb", "stride_gh", "stride_gm", "stride_gd"), dout_strides))
    shared |= dict(zip(("stride_lb", "stride_lh", "stride_lm"), problem.row_stats(lse)))

    dq_args = shared | {"DQ": dq} | problem.sink_args()
    dq_args |= dict(zip(("stride_dqb", "stride_dqh", "stride_dqm", "stride_dqd"), problem.rows(dq)))
    launch.run(attention_dq_kernel, _TUNED_DQ, "backward_dq", problem, dq_args)

    deterministic = torch.are_deterministic_algorithms_enabled()
    need_mask_grad = need_mask_grad and problem.mask is not None
    need_alibi_grad = need_alibi_grad and problem.alibi is not None
    dmask, dmask_strides, dmask_summed = None, dict.fromkeys(
        ("stride_xb", "stride_xh", "stride_xk", "stride_xm", "stride_xn", "stride_xblock"), 0), ()
    if need_mask_grad:
        dmask, dmask_strides, dmask_summed = _mask_grad_buffer(problem, deterministic)
    dalibi = None
    if need_alibi_grad:
        n_blocks = triton.cdiv(problem.max_seqlen_k, 16)  # every tile's key block is a multiple of 16
        dalibi = torch.zeros(problem.batch, problem.heads, n_blocks, dtype=torch.float32, device=problem.q.device)
    dkdv = shared | {"DK": dk, "DV": dv, "DMask": dmask, "DAlibi": dalibi, **dmask_strides}
    dkdv |= dict(zip(("stride_dkb", "stride_dkh", "stride_dkn", "stride_dkd"), problem.rows(dk)))
    dkdv |= dict(zip(("stride_dvb", "stride_dvh", "stride_dvn", "stride_dvd"), problem.rows(dv)))
    dkdv |= dict(zip(("stride_yb", "stride_yh", "stride_yblock"), dalibi.stride() if dalibi is not None else (0, 0, 0)))
    mask_shape = problem.mask.shape if problem.mask is not None else (1, 1, 1, 1)
    dkdv |= {"MASK_GRAD": need_mask_grad, "MASK_SUM_ROWS": mask_shape[2] == 1, "MASK_SUM_COLS": mask_shape[3] == 1,
             "ALIBI_GRAD": need_alibi_grad}
    launch.run(attention_dkdv_kernel, _TUNED_DKDV, "backward_dkdv", problem, dkdv)

    mask_grad = None
    if dmask is not None:
        mask_grad = dmask.sum(dim=dmask_summed, keepdim=True) if dmask_summed else dmask
        mask_grad = mask_grad.reshape(problem.mask.shape)
    slope_grad = None
    if dalibi is not None:
        slope_grad = dalibi.sum(-1)
        if problem.alibi.shape[0] == 1:
            slope_grad = slope_grad.sum(0, keepdim=True)
    sink_grad = None
    if need_sinks_grad and problem.sinks is not None:
        sink_grad = _sink_gradient(problem, lse, lse_fix, delta)
    return mask_grad, slope_grad, sink_grad


def _sink_gradient(problem: launch.Problem, lse, lse_fix, delta) -> torch.Tensor:
    """``d sinks[h] = -sum over batch and rows of p_sink * delta``, ``p_sink = exp(sink - lse - lse_fix)``
    (a row whose lse is -inf saw nothing and had no sink: it contributes 0)."""
    heads_dim = 0 if problem.varlen else 1  # lse is (Hq, total) packed, (B, Hq, L) dense
    shape = [1] * lse.dim()
    shape[heads_dim] = -1
    sinks = problem.sinks.to(torch.float32).view(shape)
    p_sink = torch.exp(sinks - lse.masked_fill(torch.isneginf(lse), 0.0) - lse_fix)
    dims = [d for d in range(lse.dim()) if d != heads_dim]
    return -(p_sink * delta).sum(dims)
