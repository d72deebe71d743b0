"""FlashAttention-2 forward in Triton: online softmax over key tiles, output and log-sum-exp.

One program per (query block, head, batch). It walks only the key tiles its causal/window/key-length
rules can see, keeps a running row max and row sum in float32, and writes ``out`` (in the input dtype)
and ``lse`` (float32, ``-inf`` for a row that sees nothing; its output is 0). Learned sinks join each
row's denominator after the last tile (lse includes them). Dense and packed (varlen) inputs share the
kernel: a varlen program reads its sequence's bounds from ``cu_seqlens``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import attention_launch as launch
from .attention_tiles import dropout_keep, key_range, scores


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
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m[:, None]
    q = tl.load(
        q_base + rows.to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd,
        mask=(rows < seq_q) & (offs_d[None, :] < head_dim), other=0.0,
    )
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    keep_scale = 1.0 / (1.0 - dropout_p)
    stream = b * n_heads + h
    lo, hi = key_range(
        m0, seq_q, seq_k, window_left, window_right, key_length,
        BLOCK_M, BLOCK_N, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
    )
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        cols = offs_n[None, :]
        k = tl.load(
            k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
            mask=(offs_n[:, None] < seq_k) & (offs_d[None, :] < head_dim), other=0.0,
        )
        # the expression the backward passes recompute: the same scores, bit for bit, with equal tiles
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, _ = scores(
            qk, rows, cols, seq_q, seq_k, scale, softcap, slope, mask_base, stride_mm, stride_mn,
            window_left, window_right, key_length,
            SOFTCAP, ALIBI, MASK, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
        )
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # A row that has seen only -inf so far keeps exponent base 0: exp(-inf - 0) = 0, never NaN.
        base = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(row_max - base)
        p = tl.exp(s - base[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)  # the softmax denominator is taken before dropout
        if DROPOUT:
            keep = dropout_keep(seed, stream, rows, cols, dropout_p)
            p = tl.where(keep, p * keep_scale, 0.0)
        v = tl.load(
            v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
            mask=(offs_n[:, None] < seq_k) & (offs_dv[None, :] < value_head_dim), other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    if SINKS:  # one more term exp(sink) in the denominator, with no value
        sink = tl.load(Sinks + h).to(tl.float32)
        new_max = tl.maximum(row_max, sink)
        base = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(row_max - base)
        row_sum = row_sum * alpha + tl.exp(sink - base)
        acc = acc * alpha[:, None]
        row_max = new_max
    seen = row_sum > 0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    lse = tl.where(seen, row_max + tl.log(tl.where(seen, row_sum, 1.0)), float("-inf"))
    out_base = Out + b64 * stride_ob + h64 * stride_oh + q_start * stride_om
    tl.store(
        out_base + rows.to(tl.int64) * stride_om + offs_dv[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=(rows < seq_q) & (offs_dv[None, :] < value_head_dim),
    )
    lse_base = Lse + b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
    tl.store(lse_base + offs_m.to(tl.int64) * stride_lm, lse, mask=offs_m < seq_q)


_TUNED = launch.autotuned(attention_forward_kernel, "forward")


def attention_forward(problem: launch.Problem, out, lse) -> None:
    """Writes ``out`` and ``lse`` (see :class:`~.attention_launch.Problem` for the layouts)."""
    args = problem.forward_args(out, lse)
    launch.run(attention_forward_kernel, _TUNED, "forward", problem, args)
