"""Autograd rules of the positional-encoding ops, one set for the C++ ops (``fused_attention::rotary``,
``rotary_qk``, ``add_sinusoidal_position_encoding``) and the Triton ones (``triton_rotary``, ...).

They are registered with torch.library (what ``torch.compile`` traces) and also handed to
:class:`~fused_attention.ops.eager.EagerOp`, which eager calls go through: torch.library's generated
``autograd.Function`` has no separate ``setup_context``, so functorch's transforms (``torch.func.grad``,
``vjp``, ``jacrev``) refused the ops (pytorch/pytorch#170834).

A rotation is orthogonal: its backward is the rotation by -theta, i.e. the same op with ``conjugate``
flipped. cos, sin and positions get no gradient (tables that need one take the torch backend). The
sinusoidal add's gradient passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .eager import EagerOp

Rules = tuple[Callable[..., None], Callable[..., Any]]


def rotary_rules(rotary: Callable[..., torch.Tensor]) -> Rules:
    """``(setup_context, backward)`` of a rotary op ``(x, cos, sin, positions, interleaved, conjugate)``;
    the backward calls ``rotary`` itself."""

    def setup_context(ctx, inputs, output):
        _, cos, sin, positions, ctx.interleaved, ctx.conjugate = inputs
        ctx.save_for_backward(cos, sin, positions)

    def backward(ctx, grad):
        cos, sin, positions = ctx.saved_tensors
        return rotary(grad, cos, sin, positions, ctx.interleaved, not ctx.conjugate), None, None, None, None, None

    return setup_context, backward


def rotary_qk_rules(rotary_qk: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Rules:
    """The same for ``(q, k, cos, sin, positions, interleaved, conjugate)`` ops returning ``(q, k)``."""

    def setup_context(ctx, inputs, output):
        _, _, cos, sin, positions, ctx.interleaved, ctx.conjugate = inputs
        ctx.save_for_backward(cos, sin, positions)
        # Shape, dtype and device only, for a missing gradient: the outputs themselves are not kept alive.
        ctx.output_specs = [(t.shape, t.dtype, t.device) for t in output]

    def backward(ctx, grad_q, grad_k):
        cos, sin, positions = ctx.saved_tensors
        # Autograd materializes a missing gradient as zeros; this covers callers that turned that off.
        grad_q, grad_k = (
            torch.zeros(shape, dtype=dtype, device=device) if grad is None else grad
            for grad, (shape, dtype, device) in zip((grad_q, grad_k), ctx.output_specs)
        )
        grad_q, grad_k = rotary_qk(grad_q, grad_k, cos, sin, positions, ctx.interleaved, not ctx.conjugate)
        return grad_q, grad_k, None, None, None, None, None

    return setup_context, backward


def _sinusoidal_setup_context(ctx, inputs, output):
    pass  # the gradient needs nothing saved


def _sinusoidal_backward(ctx, grad):
    return grad, None, None, None


SINUSOIDAL_RULES: Rules = (_sinusoidal_setup_context, _sinusoidal_backward)


def _overload(name: str) -> Any:
    namespace, op = name.split("::")
    return getattr(getattr(torch.ops, namespace), op).default


def register_position_autograd(rotary: str, rotary_qk: str, add_sinusoidal: str) -> None:
    """Registers the rules for three ops, by name (``"namespace::op"``)."""
    for name, (setup_context, backward) in (
        (rotary, rotary_rules(_overload(rotary))),
        (rotary_qk, rotary_qk_rules(_overload(rotary_qk))),
        (add_sinusoidal, SINUSOIDAL_RULES),
    ):
        torch.library.register_autograd(name, backward, setup_context=setup_context)


class PositionOps(NamedTuple):
    """A backend's three ops, by role."""

    rotary: Callable[..., Any]
    rotary_qk: Callable[..., Any]
    add_sinusoidal: Callable[..., Any]

    @classmethod
    def registered(cls, rotary: str, rotary_qk: str, add_sinusoidal: str) -> PositionOps:
        """The ops named (``"namespace::op"``) themselves: what ``torch.compile`` traces."""
        return cls(_overload(rotary), _overload(rotary_qk), _overload(add_sinusoidal))

    @classmethod
    def eager(cls, rotary: str, rotary_qk: str, add_sinusoidal: str) -> PositionOps:
        """The same ops through :class:`EagerOp`, with the rules above."""
        ops = cls.registered(rotary, rotary_qk, add_sinusoidal)
        return cls(
            EagerOp(ops.rotary, *rotary_rules(ops.rotary)),
            EagerOp(ops.rotary_qk, *rotary_qk_rules(ops.rotary_qk)),
            EagerOp(ops.add_sinusoidal, *SINUSOIDAL_RULES),
        )
