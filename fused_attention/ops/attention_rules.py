"""Fake (meta) and autograd rules shared by every attention op pair with the canonical signatures.

Dense: ``op(q, k, v, mask, key_lengths, alibi, seed, causal, window_left, window_right, softcap, scale,
dropout_p) -> (out, lse)`` with ``backward(dout, q, k, v, mask, key_lengths, alibi, seed, <options>,
need_mask_grad, need_alibi_grad) -> (dq, dk, dv, dmask, dalibi)``. Varlen: ``op(q, k, v, cu_seqlens_q,
cu_seqlens_k, alibi, seed, window_left, window_right, softcap, scale, dropout_p) -> (out, lse)`` with
``backward(dout, q, k, v, cu_q, cu_k, alibi, seed, <options>, need_alibi_grad) -> (dq, dk, dv, dalibi)``.
The torch backend's Python ops and the extension's C++ ops both follow them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

DENSE_OPTIONS = 6  # causal, window_left, window_right, softcap, scale, dropout_p
VARLEN_OPTIONS = 5  # window_left, window_right, softcap, scale, dropout_p


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_fake(q: Tensor, k: Tensor, v: Tensor, *_args) -> tuple[Tensor, Tensor]:
    b, h, seq_q, _ = q.shape
    return q.new_empty(b, h, seq_q, v.shape[-1]), q.new_empty(b, h, seq_q, dtype=lse_dtype(q.dtype))


def dense_backward_fake(dout, q, k, v, mask, key_lengths, alibi, *rest) -> tuple[Tensor, ...]:
    need_mask_grad, need_alibi_grad = rest[-2:]
    # The real ops return fresh contiguous gradients, whatever the inputs' strides.
    dmask = mask.new_empty(mask.shape) if need_mask_grad else q.new_empty(0)
    dalibi = alibi.new_empty(alibi.shape) if need_alibi_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask, dalibi


def varlen_fake(q: Tensor, k: Tensor, v: Tensor, *_args) -> tuple[Tensor, Tensor]:
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    return out, q.new_empty(q.shape[1], q.shape[0], dtype=lse_dtype(q.dtype))


def varlen_backward_fake(dout, q, k, v, cu_q, cu_k, alibi, *rest) -> tuple[Tensor, ...]:
    dalibi = torch.empty_like(alibi) if rest[-1] else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dalibi


def _save(ctx, inputs, output) -> None:
    """Saves the tensors (the first 7 inputs: q, k, v, then mask/key_lengths/alibi/seed or
    cu_q/cu_k/alibi/seed) and the non-tensor options; lse is returned detached."""
    ctx.options = inputs[7:]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs[:7])


def dense_autograd_rules(backward_op: Callable[..., tuple[Tensor, ...]]) -> tuple[Callable, Callable]:
    """``(setup_context, backward)`` of a dense attention op whose gradients ``backward_op`` computes."""

    def backward(ctx, dout, _dlse):
        q, k, v, mask, key_lengths, alibi, seed = ctx.saved_tensors
        need_mask_grad = mask is not None and ctx.needs_input_grad[3]
        need_alibi_grad = alibi is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dmask, dalibi = backward_op(
            dout.contiguous(), q, k, v, mask, key_lengths, alibi, seed, *ctx.options, need_mask_grad, need_alibi_grad
        )
        return (
            dq, dk, dv, dmask if need_mask_grad else None, None, dalibi if need_alibi_grad else None, None,
            *([None] * DENSE_OPTIONS),
        )

    return _save, backward


def register_dense_autograd(op: object, backward_op: Callable[..., tuple[Tensor, ...]]) -> None:
    """Registers the gradient of a dense attention op (a custom op or an op name) through ``backward_op``."""
    setup_context, backward = dense_autograd_rules(backward_op)
    torch.library.register_autograd(op, backward, setup_context=setup_context)


def varlen_autograd_rules(backward_op: Callable[..., tuple[Tensor, ...]]) -> tuple[Callable, Callable]:
    """``(setup_context, backward)`` of a packed attention op whose gradients ``backward_op`` computes."""

    def backward(ctx, dout, _dlse):
        q, k, v, cu_q, cu_k, alibi, seed = ctx.saved_tensors
        need_alibi_grad = alibi is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dalibi = backward_op(
            dout.contiguous(), q, k, v, cu_q, cu_k, alibi, seed, *ctx.options, need_alibi_grad
        )
        return dq, dk, dv, None, None, dalibi if need_alibi_grad else None, None, *([None] * VARLEN_OPTIONS)

    return _save, backward


def register_varlen_autograd(op: object, backward_op: Callable[..., tuple[Tensor, ...]]) -> None:
    """Registers the gradient of a packed attention op through ``backward_op``."""
    setup_context, backward = varlen_autograd_rules(backward_op)
    torch.library.register_autograd(op, backward, setup_context=setup_context)
