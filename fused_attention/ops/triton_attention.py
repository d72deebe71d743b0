"""Custom ops for the ``triton`` backend's attention: dense and packed (varlen), forward and backward.

Same schemas and semantics as the ``torch`` backend's ops (:mod:`.torch_attention`, :mod:`.torch_varlen`)
and the same fake rules (:mod:`.attention_rules`), except that the forward's output and log-sum-exp are
saved for the backward (FlashAttention-2 style: ``P = exp(S - lse)``, ``delta = rowsum(dO * O)``), so
the backward ops also take ``out`` (after ``dout``) and ``lse`` (after ``seed``), and varlen also takes
``max_seqlen_q/k`` (last) so that launching never reads ``cu_seqlens`` back from the GPU.
``torch.compile`` sees each op as one node with an explicit fake implementation (``custom_op`` +
``register_fake``, which also works under ``TRITON_INTERPRET=1`` on CPU tensors) and a registered
autograd formula.

Importing this module imports Triton and defines the kernels: do it only when
:func:`fused_attention.kernels.triton.triton_unavailable_reason` returns None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import compile_cache
from ..kernels.layout import empty_gradient_of, empty_in_layout_of
from ..kernels.triton.attention_backward import attention_backward
from ..kernels.triton.attention_forward import attention_forward
from ..kernels.triton.attention_launch import Problem
from . import attention_rules


def _dense(t: Tensor | None) -> Tensor | None:
    """A per-sequence or per-head vector as the kernels index it: element i at offset i (a view such as
    ``t[::2]`` is copied; they are tiny)."""
    return None if t is None else t.contiguous()


def _problem(q, k, v, mask, key_lengths, alibi, cu_q, cu_k, max_q, max_k, seed, causal, window_left,
             window_right, softcap, scale, dropout_p, sinks=None) -> Problem:
    return Problem(
        sinks=_dense(sinks),
        q=q, k=k, v=v, mask=mask, key_lengths=_dense(key_lengths), alibi=alibi, cu_seqlens_q=_dense(cu_q),
        cu_seqlens_k=_dense(cu_k),
        # No sequence is longer than the packed tokens: an overstated max_seqlen sized the grid (programs with
        # nothing to do; past int32, an OverflowError).
        max_seqlen_q=max_q if cu_q is None else min(max_q, q.shape[0]),
        max_seqlen_k=max_k if cu_k is None else min(max_k, k.shape[0]), causal=causal, window_left=window_left,
        window_right=window_right, softcap=softcap, scale=scale, dropout_p=dropout_p,
        seed=int(seed.item()) if seed is not None and dropout_p > 0 else 0,
    )


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


# ------------------------------------------------------------------------------------------- dense


def triton_attention_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    key_lengths: Tensor | None,
    alibi: Tensor | None,
    seed: Tensor | None,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    scale: float,
    dropout_p: float,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Canonical dense attention (see :mod:`fused_attention.inputs`): q ``(B, Hq, L, E)``,
    k ``(B, Hkv, S, E)``, v ``(B, Hkv, S, Ev)`` of one dtype (float16/bfloat16/float32), any strides;
    mask 4-D broadcastable (bool: True attends; float: added); key_lengths ``(B,)``; alibi float32
    ``(1 or B, Hq)``; seed int64 ``(1,)`` (dropout); sinks float32 ``(Hq,)`` (lse includes them). Returns ``out (B, Hq, L, Ev)`` in q's dtype and
    ``lse (B, Hq, L)`` float32 (``-inf`` and output 0 for a row that sees no key)."""
    batch, heads, seq_q, _ = q.shape
    out = empty_in_layout_of(q, v.shape[-1])
    lse = q.new_empty(batch, heads, seq_q, dtype=attention_rules.lse_dtype(q.dtype))
    if out.numel() or lse.numel():
        problem = _problem(q, k, v, mask, key_lengths, alibi, None, None, seq_q, k.shape[2], seed, causal,
                           window_left, window_right, softcap, scale, dropout_p, sinks)
        attention_forward(problem, out, lse)
    return out, lse


triton_attention = torch.library.custom_op("fused_attention::triton_attention", mutates_args=())(
    triton_attention_impl
)
triton_attention.register_fake(attention_rules.dense_fake)


@torch.library.custom_op("fused_attention::triton_attention_backward", mutates_args=())
def triton_attention_backward(
    dout: Tensor,
    out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    key_lengths: Tensor | None,
    alibi: Tensor | None,
    seed: Tensor | None,
    lse: Tensor,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    scale: float,
    dropout_p: float,
    need_mask_grad: bool,
    need_alibi_grad: bool,
    sinks: Tensor | None = None,
    need_sinks_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dmask, dalibi, dsinks)`` from the forward's ``out`` and ``lse``; dmask (the mask's
    broadcast shape and dtype), dalibi and dsinks are empty tensors unless asked for."""
    dq, dk, dv = (empty_gradient_of(t) for t in (q, k, v))
    dmask = dalibi = dsinks = None
    if dq.numel() or dk.numel() or dv.numel():
        problem = _problem(q, k, v, mask, key_lengths, alibi, None, None, q.shape[2], k.shape[2], seed, causal,
                           window_left, window_right, softcap, scale, dropout_p, sinks)
        dmask, dalibi, dsinks = attention_backward(
            problem, dout, lse, dq, dk, dv, need_mask_grad, need_alibi_grad, need_sinks_grad, out=out
        )
    if need_mask_grad:
        dmask = mask.new_zeros(mask.shape) if dmask is None else dmask.to(mask.dtype)
    if need_alibi_grad:
        dalibi = alibi.new_zeros(alibi.shape) if dalibi is None else dalibi.to(alibi.dtype)
    return dq, dk, dv, _or_empty(dmask, q), _or_empty(dalibi, q), _sinks_grad(dsinks, sinks, need_sinks_grad, q)


def _sinks_grad(dsinks: Tensor | None, sinks: Tensor | None, need: bool, like: Tensor) -> Tensor:
    if not need:
        return like.new_empty(0)
    return sinks.new_zeros(sinks.shape) if dsinks is None else dsinks.to(sinks.dtype)


# The trailing sink arguments have defaults, so callers (and fakes, and setup_context) may omit them.
_DENSE_INPUTS = 13  # q .. dropout_p of triton_attention, before sinks
_VARLEN_INPUTS = 14  # q .. max_seqlen_k of triton_varlen, before sinks


def _dense_backward_fake(dout, out, q, k, v, mask, key_lengths, alibi, seed, lse, causal, window_left, window_right,
                         softcap, scale, dropout_p, need_mask_grad, need_alibi_grad, sinks=None,
                         need_sinks_grad=False):
    grads = attention_rules.dense_backward_fake(dout, q, k, v, mask, key_lengths, alibi, need_mask_grad, need_alibi_grad)
    return *grads, (sinks.new_empty(sinks.shape) if need_sinks_grad else q.new_empty(0))


triton_attention_backward.register_fake(_dense_backward_fake)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, key_lengths, alibi, seed, *options = inputs[:_DENSE_INPUTS]
    sinks = inputs[_DENSE_INPUTS] if len(inputs) > _DENSE_INPUTS else None
    out, lse = output
    ctx.options = options
    ctx.mark_non_differentiable(lse)  # returned detached, as the public function documents
    ctx.with_sinks = len(inputs) > _DENSE_INPUTS
    ctx.save_for_backward(q, k, v, out, lse, mask, key_lengths, alibi, seed, sinks)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask, key_lengths, alibi, seed, sinks = ctx.saved_tensors
    need_mask_grad = mask is not None and ctx.needs_input_grad[3]
    need_alibi_grad = alibi is not None and ctx.needs_input_grad[5]
    need_sinks_grad = sinks is not None and ctx.needs_input_grad[_DENSE_INPUTS]
    dq, dk, dv, dmask, dalibi, dsinks = attention_rules.first_order(triton_attention_backward, (
        dout, out, q, k, v, mask, key_lengths, alibi, seed, lse, *ctx.options, need_mask_grad, need_alibi_grad, sinks,
        need_sinks_grad,
    ))
    return (
        dq, dk, dv, dmask if need_mask_grad else None, None, dalibi if need_alibi_grad else None, None,
        *([None] * len(ctx.options)), *([dsinks if need_sinks_grad else None] if ctx.with_sinks else []),
    )


triton_attention.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ varlen


def triton_varlen_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    alibi: Tensor | None,
    seed: Tensor | None,
    window_left: int,
    window_right: int,
    softcap: float,
    scale: float,
    dropout_p: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Packed attention: q ``(total_q, Hq, E)``, k ``(total_k, Hkv, E)``, v ``(total_k, Hkv, Ev)``;
    sequence ``b`` is rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` (none longer than ``max_seqlen``);
    windows (causal included) are bottom-right per sequence. Returns ``out (total_q, Hq, Ev)`` and
    ``lse (Hq, total_q)`` float32."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])  # zeros: rows outside every sequence stay 0
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32)
    if cu_seqlens_q.numel() > 1 and out.numel():
        problem = _problem(q, k, v, None, None, alibi, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           seed, False, window_left, window_right, softcap, scale, dropout_p, sinks)
        attention_forward(problem, out, lse)
    return out, lse


triton_varlen = torch.library.custom_op("fused_attention::triton_varlen", mutates_args=())(triton_varlen_impl)
triton_varlen.register_fake(attention_rules.varlen_fake)


@torch.library.custom_op("fused_attention::triton_varlen_backward", mutates_args=())
def triton_varlen_backward(
    dout: Tensor,
    out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    alibi: Tensor | None,
    seed: Tensor | None,
    lse: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    window_left: int,
    window_right: int,
    softcap: float,
    scale: float,
    dropout_p: float,
    need_alibi_grad: bool,
    sinks: Tensor | None = None,
    need_sinks_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dalibi, dsinks)``; dalibi and dsinks are empty unless asked for."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dalibi = dsinks = None
    if cu_seqlens_q.numel() > 1 and (dq.numel() or dk.numel() or dv.numel()):
        problem = _problem(q, k, v, None, None, alibi, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           seed, False, window_left, window_right, softcap, scale, dropout_p, sinks)
        _, dalibi, dsinks = attention_backward(problem, dout, lse, dq, dk, dv, False, need_alibi_grad, need_sinks_grad,
                                               out=out)
    if need_alibi_grad:
        dalibi = torch.zeros_like(alibi) if dalibi is None else dalibi.to(alibi.dtype)
    return dq, dk, dv, _or_empty(dalibi, q), _sinks_grad(dsinks, sinks, need_sinks_grad, q)


def _varlen_backward_fake(dout, out, q, k, v, cu_q, cu_k, alibi, seed, lse, max_seqlen_q, max_seqlen_k, window_left,
                          window_right, softcap, scale, dropout_p, need_alibi_grad, sinks=None, need_sinks_grad=False):
    grads = attention_rules.varlen_backward_fake(dout, q, k, v, cu_q, cu_k, alibi, need_alibi_grad)
    return *grads, (sinks.new_empty(sinks.shape) if need_sinks_grad else q.new_empty(0))


triton_varlen_backward.register_fake(_varlen_backward_fake)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, alibi, seed, *options, max_q, max_k = inputs[:_VARLEN_INPUTS]
    sinks = inputs[_VARLEN_INPUTS] if len(inputs) > _VARLEN_INPUTS else None
    ctx.with_sinks = len(inputs) > _VARLEN_INPUTS
    out, lse = output
    ctx.lengths = (max_q, max_k)
    ctx.options = options
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, seed, sinks)


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi, seed, sinks = ctx.saved_tensors
    need_alibi_grad = alibi is not None and ctx.needs_input_grad[5]
    need_sinks_grad = sinks is not None and ctx.needs_input_grad[_VARLEN_INPUTS]
    dq, dk, dv, dalibi, dsinks = attention_rules.first_order(triton_varlen_backward, (
        dout, out, q, k, v, cu_q, cu_k, alibi, seed, lse, *ctx.lengths, *ctx.options, need_alibi_grad, sinks,
        need_sinks_grad,
    ))
    return (dq, dk, dv, None, None, dalibi if need_alibi_grad else None, None,
            *([None] * (len(ctx.options) + 2)), *([dsinks if need_sinks_grad else None] if ctx.with_sinks else []))


triton_varlen.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)

# These ops register on first use, after import: the compile caches key on them too.
compile_cache.tag_compile_caches()
