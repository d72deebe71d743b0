"""Eager calls of the attention (and positional-encoding) custom ops without torch.library's per-call
Python autograd layer.

An op whose autograd is registered from Python runs Python on every call: with nothing requiring grad
it redispatches from Python (~5 us), and with an input that requires grad it builds the graph node
through a generic, pytree-based ``autograd.Function`` (~40 us for a small call). At decode shapes that
is more than the kernel. :class:`EagerOp` calls the same op below autograd when no input needs a
gradient, and otherwise through a plain ``autograd.Function`` with the op's own ``setup_context`` and
``backward`` rules (the registered ones), so gradients are the same. While ``torch.compile`` traces it
calls the op itself: its registered autograd is what the trace records. Under functorch transforms the
same rules run in a Function with a separate ``setup_context``, which those transforms require.

Below autograd, the op's call from Python still parses its arguments against the schema and boxes them
(~8 us for the 14 of attention, more than a tiny call's kernel). An op may come with a ``direct``
entry (the extension's ``attention_direct``, ``varlen_direct``): the same kernel with the same arguments, which returns
None whenever the dispatcher has work to do that it would skip (a dispatch mode, functionalization, a
tensor subclass or view bit); torch function modes and ``__torch_function__`` subclasses are checked
here. Ops implemented in Python (the Triton ones) get :func:`python_direct`: their implementation
itself, under the same rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd
_GRAD, _JVP = torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp
# True when a torch function mode is on or an argument overrides __torch_function__ (~0.1 us).
_has_torch_function = torch._C._has_torch_function


def _any_requires_grad_py(*args: Any) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


# The C++ helper is faster; torch releases without it (2.6) get the same answer in Python.
_any_requires_grad = getattr(torch._C, "_any_requires_grad", _any_requires_grad_py)


# The ops have no forward-mode derivative: a jvp through them would give a zero tangent without a word
# (the op looks constant to forward AD), so it raises, as torch's fused attention kernels do.
_NO_FORWARD_AD = (
    "fused_attention: forward-mode AD (torch.func.jvp / jacfwd / hessian, torch.autograd.forward_ad dual tensors) "
    "is not supported by the attention and positional-encoding ops; use reverse mode (torch.func.grad / vjp / "
    "jacrev, .backward())"
)


def has_tangent(args: Any) -> bool:
    """Whether a tensor among ``args`` is a forward-mode dual tensor (torch.autograd.forward_ad)."""
    return _forward_ad._current_level >= 0 and any(
        isinstance(a, torch.Tensor) and _forward_ad.unpack_dual(a).tangent is not None for a in args
    )


def _functorch_transforms() -> list[Any]:
    """The kinds (``TransformType``) of the functorch transforms on this thread's interpreter stack."""
    functorch = torch._C._functorch
    stack_of = getattr(functorch, "get_interpreter_stack", None)
    stack = stack_of() if stack_of is not None else [functorch.peek_interpreter_stack()]
    return [level.key() for level in stack or () if level is not None]


# The ops' backward ops have no derivatives of their own: nested reverse-mode transforms would see the
# gradient as constant and give a wrong (zero) second derivative without a word.
_NO_DOUBLE_GRAD = (
    "fused_attention: a second derivative (torch.func.grad of torch.func.grad, vjp or jacrev nested in one "
    "another) is not supported by the attention and positional-encoding ops; the first derivative is"
)


def _function(op: Callable[..., Any], setup_context: Callable[..., None], backward: Callable[..., Any]) -> type:
    class EagerAttention(torch.autograd.Function):
        # The old-style forward (ctx first) costs ~12 us less per call than forward + setup_context; the
        # latter is only needed for functorch transforms (_transform_function).
        @staticmethod
        def forward(ctx, *inputs):
            with _BELOW_AUTOGRAD():
                output = op(*inputs)
            setup_context(ctx, inputs, output)
            return output

    EagerAttention.backward = staticmethod(backward)  # type: ignore[method-assign]
    return EagerAttention


def _transform_function(op: Callable[..., Any], setup_context: Callable[..., None], backward: Callable[..., Any]) -> type:
    """The same rules as a Function with a separate ``setup_context``, which functorch's reverse-mode
    transforms (``torch.func.grad``, ``vjp``, ``jacrev``) require: the ``autograd.Function`` that
    torch.library generates for a registered autograd has none, and they refuse it (pytorch/pytorch#170834).
    ``vmap`` of the rules is generated (the op itself must then support vmap)."""

    class TransformAttention(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*inputs):
            return op(*inputs)

    def untracked_backward(ctx, *grads):
        # Nothing to record (EagerOp refuses nested reverse-mode transforms), and a backward op's own
        # generated autograd Function would be refused by the transform too.
        with torch.no_grad():
            return backward(ctx, *grads)

    TransformAttention.setup_context = staticmethod(setup_context)  # type: ignore[method-assign]
    TransformAttention.backward = staticmethod(untracked_backward)  # type: ignore[method-assign]
    return TransformAttention


class EagerOp:
    """``op`` (an ``OpOverload`` whose autograd is registered with ``setup_context`` and ``backward``),
    callable with the op's positional arguments."""

    def __init__(
        self, op: Callable[..., Any], setup_context: Callable[..., None], backward: Callable[..., Any],
        direct: Callable[..., Any] | None = None,
    ):
        self.op = op
        self.function = _function(op, setup_context, backward)
        self.transform_function = _transform_function(op, setup_context, backward)
        self.direct = direct

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.op(*args)
        if torch._C._are_functorch_transforms_active():
            transforms = _functorch_transforms()
            if _JVP in transforms:
                raise NotImplementedError(_NO_FORWARD_AD)
            if transforms.count(_GRAD) > 1:
                raise NotImplementedError(_NO_DOUBLE_GRAD)
            return self.transform_function.apply(*args)
        if has_tangent(args):
            raise NotImplementedError(_NO_FORWARD_AD)
        if torch.is_grad_enabled() and _any_requires_grad(*args):
            return self.function.apply(*args)
        if self.direct is not None and not _has_torch_function(args):
            result = self.direct(*args)
            if result is not None:
                return result
        with _BELOW_AUTOGRAD():
            return self.op(*args)


def python_direct(impl: Callable[..., Any]) -> Callable[..., Any]:
    """A ``direct`` entry for an op implemented in Python: ``impl`` called with the op's arguments, past
    the dispatcher's schema parsing, boxing and return to Python (on a Triton op's small call most of
    its host time), or None whenever the dispatcher has work to do that calling ``impl`` would skip: a
    dispatch mode, the JIT tracer, a profiler that records ops, or a tensor that is not a plain
    ``torch.Tensor`` (fake, functional and other subclasses), lives on the meta device, or is a negative,
    conjugate or zero view. Not seen either: kernels a user registers for the op with
    ``torch.library.register_kernel``, and observers other than the profiler."""

    def direct(*args: Any) -> Any:
        if (
            _get_current_dispatch_mode() is not None
            or torch.autograd._profiler_enabled()
            or torch._C._get_tracing_state() is not None
        ):
            return None
        for a in args:
            if isinstance(a, torch.Tensor) and (
                type(a) is not torch.Tensor or a.is_meta or a.is_neg() or a.is_conj() or a._is_zerotensor()
            ):
                return None  # (the dispatcher resolves negative and conjugate views; kernels read raw memory)
        return impl(*args)

    return direct
