"""Fake (meta) and autograd rules shared by every attention op pair with the canonical signatures.

Dense: ``op(q, k, v, mask, key_lengths, alibi, seed, causal, window_left, window_right, softcap, scale,
dropout_p) -> (out, lse)`` with ``backward(dout, q, k, v, mask, key_lengths, alibi, seed, <options>,
need_mask_grad, need_alibi_grad) -> (dq, dk, dv, dmask, dalibi)``. Varlen: ``op(q, k, v, cu_seqlens_q,
cu_seqlens_k, alibi, seed, window_left, window_right, softcap, scale, dropout_p) -> (out, lse)`` with
``backward(dout, q, k, v, cu_q, cu_k, alibi, seed, <options>, need_alibi_grad) -> (dq, dk, dv, dalibi)``.
The torch backend's Python ops and the extension's C++ ops both follow them.

Ops that take attention sinks (``sinks=True`` below) have one more tensor, ``sinks`` (Hq,), right after
``seed``; their backward takes it there too, ends with ``need_sinks_grad`` and returns ``dsinks`` last.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ..kernels.layout import empty_gradient_of, empty_in_layout_of

DENSE_OPTIONS = 6  # causal, window_left, window_right, softcap, scale, dropout_p
VARLEN_OPTIONS = 5  # window_left, window_right, softcap, scale, dropout_p


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_fake(q: Tensor, k: Tensor, v: Tensor, *_args) -> tuple[Tensor, Tensor]:
    b, h, seq_q, _ = q.shape
    return empty_in_layout_of(q, v.shape[-1]), q.new_empty(b, h, seq_q, dtype=lse_dtype(q.dtype))


def precise_lse_fake(q: Tensor, k: Tensor, v: Tensor, *_args) -> tuple[Tensor, Tensor]:
    """``attention_precise_lse``'s: the output as :func:`dense_fake`'s, lse in float64."""
    return dense_fake(q, k, v)[0], q.new_empty(q.shape[:-1], dtype=torch.float64)


def backward_from_stats_fake(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, *_args) -> tuple[Tensor, ...]:
    return empty_gradient_of(q), empty_gradient_of(k), empty_gradient_of(v)


def dense_backward_fake(dout, q, k, v, mask, key_lengths, alibi, *rest) -> tuple[Tensor, ...]:
    need_mask_grad, need_alibi_grad = rest[-2:]
    # dq, dk, dv in their inputs' layouts; the mask's and slopes' gradients fresh and contiguous.
    dmask = mask.new_empty(mask.shape) if need_mask_grad else q.new_empty(0)
    dalibi = alibi.new_empty(alibi.shape) if need_alibi_grad else q.new_empty(0)
    return empty_gradient_of(q), empty_gradient_of(k), empty_gradient_of(v), dmask, dalibi


def _sinks_grad_fake(q: Tensor, sinks: Tensor | None, need: bool) -> Tensor:
    return sinks.new_empty(sinks.shape) if need else q.new_empty(0)


def dense_sinks_backward_fake(dout, q, k, v, mask, key_lengths, alibi, seed, sinks, *rest) -> tuple[Tensor, ...]:
    grads = dense_backward_fake(dout, q, k, v, mask, key_lengths, alibi, *rest[:-1])
    return *grads, _sinks_grad_fake(q, sinks, rest[-1])


def varlen_fake(q: Tensor, k: Tensor, v: Tensor, *_args) -> tuple[Tensor, Tensor]:
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    return out, q.new_empty(q.shape[1], q.shape[0], dtype=lse_dtype(q.dtype))


def varlen_backward_fake(dout, q, k, v, cu_q, cu_k, alibi, *rest) -> tuple[Tensor, ...]:
    dalibi = torch.empty_like(alibi) if rest[-1] else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dalibi


def varlen_sinks_backward_fake(dout, q, k, v, cu_q, cu_k, alibi, seed, sinks, *rest) -> tuple[Tensor, ...]:
    grads = varlen_backward_fake(dout, q, k, v, cu_q, cu_k, alibi, *rest[:-1])
    return *grads, _sinks_grad_fake(q, sinks, rest[-1])


def _saver(tensors: int) -> Callable[..., None]:
    """Saves the first ``tensors`` inputs (q, k, v, then mask/key_lengths/alibi/seed or cu_q/cu_k/alibi/seed,
    then sinks if the op has them) and keeps the non-tensor options; lse is returned detached."""

    def save(ctx, inputs, output) -> None:
        ctx.options = inputs[tensors:]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*inputs[:tensors])

    return save


# As csrc/cpu/attention_plain_grad.cpp says it for the short path's node.
NO_SECOND_DERIVATIVE = (
    "fused_attention: attention gradients have no derivative of their own (a gradient penalty, or any "
    "second derivative, through attention is not supported)"
)


class _NoSecondDerivative(torch.autograd.Function):
    """Gradients computed under ``create_graph``: returned as they are, through a node that raises when a
    second derivative reaches it. It takes what they depend on (dout, the saved inputs) as inputs too,
    so the engine cannot skip it on the way to them (``once_differentiable``'s node leads nowhere)."""

    @staticmethod
    def forward(ctx, count: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.detach() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads: Tensor) -> None:
        raise RuntimeError(NO_SECOND_DERIVATIVE)


def first_order(backward_op: Callable[..., tuple[Tensor, ...]], args: tuple) -> tuple[Tensor, ...]:
    """``backward_op(*args)``; under ``create_graph`` (grad mode on in a backward), through
    :class:`_NoSecondDerivative`. (The ops have no derivatives: the C++ ones fell to torch's fallback,
    which only warned, and a penalty's attention term came out 0.)"""
    if not torch.is_grad_enabled():  # the common case
        return backward_op(*args)
    with torch.no_grad():
        grads = backward_op(*args)
    return _through_no_second_derivative(grads, args)


def _through_no_second_derivative(results: tuple, inputs: tuple) -> tuple:
    """``results``' tensors through :class:`_NoSecondDerivative`, depending on those of ``inputs`` that
    require grad (``results`` as they are when none does)."""
    depends = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    present = [i for i, r in enumerate(results) if isinstance(r, Tensor)]
    if not depends or not present:
        return results
    wrapped = iter(_NoSecondDerivative.apply(len(present), *(results[i] for i in present), *depends))
    return tuple(next(wrapped) if isinstance(r, Tensor) else r for r in results)


def first_order_backward(backward: Callable[..., tuple]) -> Callable[..., tuple]:
    """A ``torch.autograd.Function``'s backward made :func:`first_order`: under ``create_graph`` its
    gradients go through :class:`_NoSecondDerivative`, depending on the incoming gradients and the saved
    tensors (context parallelism's ring, whose backward runs attention's backward kernels itself)."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():
            results = backward(ctx, *grads)
        return _through_no_second_derivative(results, (*grads, *ctx.saved_tensors))

    return wrapped


def _sinks_needs(ctx, sink: list[Tensor | None]) -> tuple[bool, ...]:
    """``(need_sinks_grad,)`` for ops with sinks (input 7; ``sink``: its saved tensor, as a list of one),
    else ``()``. (The saved tensors are read once per backward: non-reentrant checkpointing refuses a
    second unpack.)"""
    return (sink[0] is not None and ctx.needs_input_grad[7],) if sink else ()


def dense_autograd_rules(
    backward_op: Callable[..., tuple[Tensor, ...]], sinks: bool = False
) -> tuple[Callable, Callable]:
    """``(setup_context, backward)`` of a dense attention op whose gradients ``backward_op`` computes;
    ``sinks``: the ops take sink logits (see the module docstring)."""

    def backward(ctx, dout, _dlse):
        q, k, v, mask, key_lengths, alibi, seed, *sink = ctx.saved_tensors
        need_mask_grad = mask is not None and ctx.needs_input_grad[3]
        need_alibi_grad = alibi is not None and ctx.needs_input_grad[5]
        need_sinks = _sinks_needs(ctx, sink)
        dq, dk, dv, dmask, dalibi, *dsinks = first_order(backward_op, (
            dout, q, k, v, mask, key_lengths, alibi, seed, *sink, *ctx.options, need_mask_grad,
            need_alibi_grad, *need_sinks,
        ))
        return (
            dq, dk, dv, dmask if need_mask_grad else None, None, dalibi if need_alibi_grad else None, None,
            *(dsinks[0] if need else None for need in need_sinks), *([None] * DENSE_OPTIONS),
        )

    return _saver(8 if sinks else 7), backward


def register_dense_autograd(op: object, backward_op: Callable[..., tuple[Tensor, ...]], sinks: bool = False) -> None:
    """Registers the gradient of a dense attention op (a custom op or an op name) through ``backward_op``."""
    setup_context, backward = dense_autograd_rules(backward_op, sinks)
    torch.library.register_autograd(op, backward, setup_context=setup_context)


def varlen_autograd_rules(
    backward_op: Callable[..., tuple[Tensor, ...]], sinks: bool = False
) -> tuple[Callable, Callable]:
    """``(setup_context, backward)`` of a packed attention op whose gradients ``backward_op`` computes
    (``sinks`` as for dense)."""

    def backward(ctx, dout, _dlse):
        q, k, v, cu_q, cu_k, alibi, seed, *sink = ctx.saved_tensors
        need_alibi_grad = alibi is not None and ctx.needs_input_grad[5]
        need_sinks = _sinks_needs(ctx, sink)
        dq, dk, dv, dalibi, *dsinks = first_order(backward_op, (
            dout, q, k, v, cu_q, cu_k, alibi, seed, *sink, *ctx.options, need_alibi_grad, *need_sinks
        ))
        return (
            dq, dk, dv, None, None, dalibi if need_alibi_grad else None, None,
            *(dsinks[0] if need else None for need in need_sinks), *([None] * VARLEN_OPTIONS),
        )

    return _saver(8 if sinks else 7), backward


def register_varlen_autograd(
    op: object, backward_op: Callable[..., tuple[Tensor, ...]], sinks: bool = False
) -> None:
    """Registers the gradient of a packed attention op through ``backward_op`` (``sinks`` as for dense)."""
    setup_context, backward = varlen_autograd_rules(backward_op, sinks)
    torch.library.register_autograd(op, backward, setup_context=setup_context)
