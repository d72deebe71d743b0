"""Custom ops for the ``torch`` backend: chunked attention as single graph nodes.

``torch.compile`` sees each op as one opaque node (it does not unroll the chunk loop), with a fake
implementation for shapes and a registered autograd formula that calls the backward op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import chunked
from . import attention_rules


def torch_attention_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    key_lengths: Tensor | None,
    alibi: Tensor | None,
    seed: Tensor | None,
    sinks: Tensor | None,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Canonical dense attention; returns ``(out, lse)`` (see :mod:`fused_attention.kernels.chunked`)."""
    rules = chunked.rules_from_op(causal, window_left, window_right, softcap, scale, dropout_p, seed)
    return chunked.attention_forward(q, k, v, mask, key_lengths, alibi, rules, sinks)


torch_attention = torch.library.custom_op("fused_attention::torch_attention", mutates_args=())(
    torch_attention_impl
)
torch_attention.register_fake(attention_rules.dense_fake)


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
    sinks: Tensor | None,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    scale: float,
    dropout_p: float,
    need_mask_grad: bool,
    need_alibi_grad: bool,
    need_sinks_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dmask, dalibi, dsinks)``; dmask/dalibi/dsinks are empty tensors unless asked for."""
    rules = chunked.rules_from_op(causal, window_left, window_right, softcap, scale, dropout_p, seed)
    dq, dk, dv, dmask, dalibi, dsinks = chunked.attention_backward(
        dout, q, k, v, mask, key_lengths, alibi, rules, need_mask_grad, need_alibi_grad, sinks, need_sinks_grad
    )
    return dq, dk, dv, _or_empty(dmask, q), _or_empty(dalibi, q), _or_empty(dsinks, q)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


torch_attention_backward.register_fake(attention_rules.dense_sinks_backward_fake)
attention_rules.register_dense_autograd(torch_attention, torch_attention_backward, sinks=True)
