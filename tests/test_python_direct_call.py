"""Eager calls of the ops implemented in Python (the ``triton`` and ``torch`` backends') past the
dispatcher (``ops/eager.py``'s ``python_direct``): a call that needs no gradient runs the op's
implementation itself, equal to the op bit for bit, and is declined whenever the dispatcher has work to
do (a dispatch mode, a profiler, a tensor subclass), so those see the registered op as before."""

from __future__ import annotations

import pytest
import torch
from conftest import RecordingDispatch

import fused_attention
from fused_attention.backends import BACKENDS, torch_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_TRITON_REASON = BACKENDS["triton"].unavailable_reason()
needs_triton = pytest.mark.skipif(_TRITON_REASON is not None, reason=str(_TRITON_REASON))


def _count(monkeypatch, ops) -> dict[str, list[int]]:
    """``{"attention": [taken, declined], "varlen": [...]}``: counts of the ops' direct entries."""
    counts = {}
    for name, op in zip(("attention", "varlen"), ops):
        entry = op.direct
        counts[name] = [0, 0]

        def counting(*args, _entry=entry, _count=counts[name]):
            result = _entry(*args)
            _count[0 if result is not None else 1] += 1
            return result

        monkeypatch.setattr(op, "direct", counting)
    return counts


@pytest.fixture
def direct_calls(monkeypatch):
    return _count(monkeypatch, BACKENDS["triton"]._eager_ops())


@pytest.fixture
def torch_direct_calls(monkeypatch):
    return _count(monkeypatch, (torch_backend._ATTENTION, torch_backend._VARLEN))


def _qkv(*shape, grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad) for _ in range(3)]


def _op(q, k, v, **kwargs):
    """The same call through the dispatcher."""
    from fused_attention.backends.base import dense_op_args
    from fused_attention.inputs import canonicalize

    inputs = canonicalize(q, k, v, **kwargs)
    out, _ = torch.ops.fused_attention.triton_attention.default(*dense_op_args(inputs), inputs.sinks)
    return out


@needs_triton
@pytest.mark.parametrize(
    "kwargs", [{}, {"is_causal": True}, {"alibi_slopes": "slopes", "window_size": (3, 1)}, {"sinks": "sinks"}],
    ids=["plain", "causal", "alibi_window", "sinks"],
)
def test_a_plain_call_goes_direct_and_equals_the_op(direct_calls, kwargs):
    if kwargs.get("alibi_slopes") == "slopes":
        kwargs = {**kwargs, "alibi_slopes": torch.rand(3, device=DEVICE)}
    if kwargs.get("sinks") == "sinks":
        kwargs = {**kwargs, "sinks": torch.randn(3, device=DEVICE)}
    q, k, v = _qkv(2, 3, 7, 16)
    out = fused_attention.scaled_dot_product_attention(q, k, v, backend="triton", **kwargs)
    assert direct_calls["attention"] == [1, 0]
    assert torch.equal(out, _op(q, k, v, **kwargs))


@needs_triton
def test_a_packed_call_goes_direct_and_equals_the_op(direct_calls):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(11, 2, 16, generator=g).to(DEVICE) for _ in range(3))
    cu = torch.tensor([0, 4, 11], dtype=torch.int32, device=DEVICE)
    out = fused_attention.varlen_attention(q, k, v, cu, cu, 7, 7, is_causal=True, backend="triton")
    assert direct_calls["varlen"] == [1, 0]
    expected, _ = torch.ops.fused_attention.triton_varlen.default(
        q, k, v, cu, cu, None, None, -1, 0, 0.0, 16**-0.5, 0.0, 7, 7, None
    )
    assert torch.equal(out, expected)


@needs_triton
def test_a_dispatch_mode_sees_the_op(direct_calls):
    q, k, v = _qkv(1, 2, 6, 16)
    with RecordingDispatch() as recording:
        fused_attention.scaled_dot_product_attention(q, k, v, backend="triton")
    assert "fused_attention.triton_attention.default" in recording.seen and direct_calls["attention"] == [0, 1]


@needs_triton
def test_the_profiler_sees_the_op(direct_calls):
    q, k, v = _qkv(1, 2, 6, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused_attention.scaled_dot_product_attention(q, k, v, backend="triton")
    assert direct_calls["attention"] == [0, 1]
    assert any(event.name == "fused_attention::triton_attention" for event in prof.events())


@needs_triton
def test_a_subclass_tensor_takes_the_op(direct_calls):
    class Tagged(torch.Tensor):
        pass

    q, k, v = _qkv(1, 2, 6, 16)
    out = fused_attention.scaled_dot_product_attention(q.as_subclass(Tagged), k, v, backend="triton")
    assert direct_calls["attention"] == [0, 0]  # a __torch_function__ subclass: not even asked
    assert torch.equal(out.as_subclass(torch.Tensor), _op(q, k, v))

    with torch._C.DisableTorchFunctionSubclass():  # past __torch_function__: the type check declines
        fused_attention.scaled_dot_product_attention(q.as_subclass(Tagged), k, v, backend="triton")
    assert direct_calls["attention"] == [0, 1]


@needs_triton
def test_calls_that_need_a_gradient_take_the_op(direct_calls):
    q, k, v = _qkv(1, 2, 6, 16, grad=True)
    fused_attention.scaled_dot_product_attention(q, k, v, backend="triton").sum().backward()
    assert direct_calls["attention"] == [0, 0] and q.grad is not None
    with torch.no_grad():
        fused_attention.scaled_dot_product_attention(q, k, v, backend="triton")
    assert direct_calls["attention"] == [1, 0]


def test_the_torch_backends_chunked_op_goes_direct_and_equals_the_op(torch_direct_calls):
    """ALiBi is no feature of torch's SDPA: the backend's own chunked op serves the call."""
    from fused_attention.backends.base import dense_op_args
    from fused_attention.inputs import canonicalize

    q, k, v = _qkv(2, 3, 7, 16)
    kwargs = {"alibi_slopes": torch.rand(3, device=DEVICE), "is_causal": True}
    out = fused_attention.scaled_dot_product_attention(q, k, v, backend="torch", **kwargs)
    assert torch_direct_calls["attention"] == [1, 0]
    expected, _ = torch.ops.fused_attention.torch_attention.default(
        *dense_op_args(canonicalize(q, k, v, **kwargs), sinks=True)
    )
    assert torch.equal(out, expected)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused_attention.scaled_dot_product_attention(q, k, v, backend="torch", **kwargs)
    assert torch_direct_calls["attention"] == [1, 1]
    assert any(event.name == "fused_attention::torch_attention" for event in prof.events())


def _torch_backend_call(q, k, v):
    """A call the torch backend serves with its own chunked op (ALiBi is no feature of torch's SDPA)."""
    slopes = torch.linspace(0.1, 0.5, q.shape[1], device=q.device)
    return fused_attention.scaled_dot_product_attention(q, k, v, alibi_slopes=slopes, backend="torch")


def test_the_torch_backends_guards(torch_direct_calls):
    q, k, v = _qkv(1, 2, 6, 16)
    with RecordingDispatch() as recording:
        _torch_backend_call(q, k, v)
    assert "fused_attention.torch_attention.default" in recording.seen and torch_direct_calls["attention"] == [0, 1]

    class Tagged(torch.Tensor):
        pass

    with torch._C.DisableTorchFunctionSubclass():
        _torch_backend_call(q.as_subclass(Tagged), k, v)
    assert torch_direct_calls["attention"] == [0, 2]

    q_neg = torch._neg_view(q)
    out = _torch_backend_call(q_neg, k, v)
    assert torch_direct_calls["attention"] == [0, 3]
    assert torch.equal(out, _torch_backend_call(q.neg(), k, v)) and torch_direct_calls["attention"] == [1, 3]


@needs_triton
def test_a_negative_view_is_declined_and_read_as_negated(direct_calls):
    """The Triton kernels read raw memory: the dispatcher resolves the view's sign bit first."""
    q, k, v = _qkv(1, 2, 6, 16)
    q_neg = torch._neg_view(q)
    out = fused_attention.scaled_dot_product_attention(q_neg, k, v, backend="triton")
    assert direct_calls["attention"] == [0, 1]
    assert torch.equal(out, fused_attention.scaled_dot_product_attention(q.neg(), k, v, backend="triton"))
