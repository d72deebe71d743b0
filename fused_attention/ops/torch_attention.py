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


def _check_stats(dout: Tensor, q: Tensor, v: Tensor, lse: Tensor, delta: Tensor) -> None:
    batch, heads, len_q = q.shape[:3]
    for t in (lse, delta):
        if tuple(t.shape) != (batch, heads, len_q):
            raise RuntimeError(
                "fused_attention::torch_attention_backward_from_stats: lse and delta must be (B, Hq, L) = "
                f"({batch}, {heads}, {len_q}), got {tuple(t.shape)}"
            )
    if tuple(dout.shape) != (batch, heads, len_q, v.shape[-1]):
        raise RuntimeError(
            f"fused_attention::torch_attention_backward_from_stats: dout must be (B, Hq, L, Ev), got {tuple(dout.shape)}"
        )


@torch.library.custom_op("fused_attention::torch_attention_precise_lse", mutates_args=())
def torch_attention_precise_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    key_lengths: Tensor | None,
    alibi: Tensor | None,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of :func:`torch_attention_impl` with lse in float64 (no dropout, no sinks)."""
    rules = chunked.rules_from_op(causal, window_left, window_right, softcap, scale, 0.0, None)
    return chunked.attention_forward(q, k, v, mask, key_lengths, alibi, rules, precise_lse=True)


torch_attention_precise_lse.register_fake(attention_rules.precise_lse_fake)


@torch.library.custom_op("fused_attention::torch_attention_backward_from_stats", mutates_args=())
def torch_attention_backward_from_stats(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    key_lengths: Tensor | None,
    alibi: Tensor | None,
    lse: Tensor,
    delta: Tensor,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` given the whole softmax's ``lse`` and ``delta`` (see
    :func:`fused_attention.kernels.chunked.attention_backward_from_stats`)."""
    _check_stats(dout, q, v, lse, delta)
    rules = chunked.rules_from_op(causal, window_left, window_right, softcap, scale, 0.0, None)
    return chunked.attention_backward_from_stats(dout, q, k, v, mask, key_lengths, alibi, rules, lse, delta)


torch_attention_backward_from_stats.register_fake(attention_rules.backward_from_stats_fake)
