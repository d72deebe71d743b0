"""Custom ops for the ``torch`` backend: chunked attention as single graph nodes.

``torch.compile`` sees each op as one opaque node (it does not unroll the chunk loop), with a fake
implementation for shapes and a registered autograd formula that calls the backward op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import chunked


@torch.library.custom_op("fused_attention::torch_attention", mutates_args=())
def torch_attention(
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
) -> tuple[Tensor, Tensor]:
    """Canonical dense attention; returns ``(out, lse)`` (see :mod:`fused_attention.kernels.chunked`)."""
    rules = chunked.rules_from_op(causal, window_left, window_right, softcap, scale, dropout_p, seed)
    return chunked.attention_forward(q, k, v, mask, key_lengths, alibi, rules)


@torch_attention.register_fake
def _(q, k, v, mask, key_lengths, alibi, seed, causal, window_left, window_right, softcap, scale, dropout_p):
    b, h, seq_q, _ = q.shape
    out = q.new_empty(b, h, seq_q, v.shape[-1])
    return out, q.new_empty(b, h, seq_q, dtype=chunked.compute_dtype(q.dtype))


@torch.library.custom_op("fused_attention::torch_attention_backward", mutates_args=())
def torch_attention_backward(
    dout: Tensor,
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
    need_mask_grad: bool,
    need_alibi_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dmask, dalibi)``; dmask/dalibi are empty tensors unless asked for."""
    rules = chunked.rules_from_op(causal, window_left, window_right, softcap, scale, dropout_p, seed)
    dq, dk, dv, dmask, dalibi = chunked.attention_backward(
        dout, q, k, v, mask, key_lengths, alibi, rules, need_mask_grad, need_alibi_grad
    )
    return dq, dk, dv, _or_empty(dmask, q), _or_empty(dalibi, q)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


@torch_attention_backward.register_fake
def _(dout, q, k, v, mask, key_lengths, alibi, seed, causal, window_left, window_right, softcap, scale,
      dropout_p, need_mask_grad, need_alibi_grad):
    # The real op returns fresh contiguous gradients, whatever the inputs' strides.
    dmask = mask.new_empty(mask.shape) if need_mask_grad else q.new_empty(0)
    dalibi = alibi.new_empty(alibi.shape) if need_alibi_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask, dalibi


_NON_TENSOR_ARGS = ("causal", "window_left", "window_right", "softcap", "scale", "dropout_p")


def _setup_context(ctx, inputs, output):
    q, k, v, mask, key_lengths, alibi, seed, *options = inputs
    ctx.options = options
    ctx.mark_non_differentiable(output[1])  # lse is returned detached; no gradient flows through it
    ctx.save_for_backward(q, k, v, mask, key_lengths, alibi, seed)


def _backward(ctx, dout, _dlse):
    q, k, v, mask, key_lengths, alibi, seed = ctx.saved_tensors
    need_mask_grad = mask is not None and ctx.needs_input_grad[3]
    need_alibi_grad = alibi is not None and ctx.needs_input_grad[5]
    dq, dk, dv, dmask, dalibi = torch_attention_backward(
        dout.contiguous(), q, k, v, mask, key_lengths, alibi, seed, *ctx.options,
        need_mask_grad, need_alibi_grad,
    )
    return (
        dq, dk, dv, dmask if need_mask_grad else None, None, dalibi if need_alibi_grad else None, None,
        *([None] * len(_NON_TENSOR_ARGS)),
    )


torch_attention.register_autograd(_backward, setup_context=_setup_context)
