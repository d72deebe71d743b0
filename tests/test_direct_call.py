"""The CPU forward past the dispatcher (``_C.attention_direct``, see ``ops/eager.py``): taken by a plain
call, equal to the op bit for bit, and declined whenever the dispatcher has work to do, so dispatch
modes, torch function modes, view bits and profilers see the call as before."""

from __future__ import annotations

import pytest
import torch
from conftest import RecordingDispatch
from torch.overrides import TorchFunctionMode

import fused_attention
from fused_attention.backends import cpu_backend

pytestmark = pytest.mark.skipif(
    cpu_backend._OPS is None or cpu_backend._OPS.attention.direct is None, reason="needs the compiled extension"
)


def _count_direct(monkeypatch, eager_op) -> list[int]:
    """``[taken, declined]`` counts of ``eager_op``'s direct entry."""
    counts = [0, 0]
    entry = eager_op.direct

    def counting(*args):
        result = entry(*args)
        counts[0 if result is not None else 1] += 1
        return result

    monkeypatch.setattr(eager_op, "direct", counting)
    return counts


@pytest.fixture
def direct_calls(monkeypatch):
    return _count_direct(monkeypatch, cpu_backend._OPS.attention)


@pytest.fixture
def varlen_direct_calls(monkeypatch):
    if cpu_backend._OPS.varlen_attention.direct is None:
        pytest.skip("an extension built before varlen_direct")
    return _count_direct(monkeypatch, cpu_backend._OPS.varlen_attention)


def _qkv(*shape):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) for _ in range(3)]


def _op(q, k, v, **kwargs):
    """The same call through the dispatcher."""
    from fused_attention.backends.base import dense_op_args
    from fused_attention.inputs import canonicalize

    out, _ = torch.ops.fused_attention.attention.default(*dense_op_args(canonicalize(q, k, v, **kwargs), sinks=True))
    return out


@pytest.mark.parametrize(
    "kwargs", [{}, {"is_causal": True}, {"alibi_slopes": torch.tensor([0.7, 0.2, 0.4])}, {"key_lengths": torch.tensor([5, 0])},
               {"sinks": torch.tensor([0.3, -1.2, 0.8])}, {"window_size": (2, 1), "softcap": 3.0}],
    ids=["plain", "causal", "alibi", "key_lengths", "sinks", "window_softcap"],
)
def test_a_plain_call_goes_direct_and_equals_the_op(direct_calls, kwargs):
    q, k, v = _qkv(2, 3, 7, 16)
    out = fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu", **kwargs)
    assert direct_calls == [1, 0]
    assert torch.equal(out, _op(q, k, v, **kwargs))


def test_calls_that_need_autograd_or_a_mode_take_the_op(direct_calls):
    q, k, v = _qkv(1, 2, 6, 8)
    with RecordingDispatch() as recording:
        fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu")
    assert "fused_attention.attention.default" in recording.seen and direct_calls == [0, 1]

    class FunctionMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    seen = []
    with FunctionMode():
        fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu")
    assert any("attention" in name for name in seen) and direct_calls == [0, 1]  # not asked at all

    qg = q.clone().requires_grad_()
    fused_attention.scaled_dot_product_attention(qg, k, v, backend="cpu").sum().backward()
    assert direct_calls == [0, 1] and qg.grad is not None


def test_a_negative_view_is_declined_and_read_as_negated(direct_calls):
    q, k, v = _qkv(1, 2, 6, 8)
    q_neg = torch._neg_view(q)
    assert q_neg.is_neg()
    out = fused_attention.scaled_dot_product_attention(q_neg, k, v, backend="cpu")
    assert direct_calls == [0, 1]
    assert torch.equal(out, fused_attention.scaled_dot_product_attention(q.neg(), k, v, backend="cpu"))


def test_jit_trace_records_the_op(direct_calls):
    """The tracer is a thread dispatch key: the direct entry declines, so the op lands in the graph
    instead of its output being frozen as a constant."""
    q, k, v = _qkv(1, 2, 6, 8)

    def attend(q, k, v):
        return fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu")

    with torch.no_grad(), _quiet():
        traced = torch.jit.trace(attend, (q, k, v), check_trace=False)
    assert "fused_attention::attention" in str(traced.graph) and direct_calls[0] == 0
    q2 = torch.randn_like(q)
    with torch.no_grad():
        assert torch.equal(traced(q2, k, v), attend(q2, k, v))


def _quiet():
    import contextlib
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice
    return stack


def test_the_profiler_sees_a_direct_call(direct_calls):
    q, k, v = _qkv(1, 2, 6, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu")
    assert direct_calls == [1, 0]
    assert any(event.name == "fused_attention::attention" for event in prof.events())


def test_inference_mode_output_is_an_inference_tensor(direct_calls):
    q, k, v = _qkv(1, 2, 6, 8)
    with torch.inference_mode():
        out = fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu")
    assert direct_calls == [1, 0] and out.is_inference()


def _packed(total: int, heads: int, dim: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(total, heads, dim, generator=g) for _ in range(3)]


@pytest.mark.parametrize(
    "kwargs", [{}, {"is_causal": True, "window_size": (3, -1)}, {"alibi_slopes": "rand"}, {"sinks": "randn"},
               {"softcap": 2.0, "return_lse": True}],
    ids=["plain", "causal_window", "alibi", "sinks", "softcap_lse"],
)
def test_a_packed_call_goes_direct_and_equals_the_op(varlen_direct_calls, kwargs):
    from fused_attention.backends.base import varlen_op_args
    from fused_attention.varlen_inputs import canonicalize_varlen

    g = torch.Generator().manual_seed(2)
    made = {"rand": lambda: torch.rand(3, generator=g), "randn": lambda: torch.randn(3, generator=g)}
    kwargs = {name: made[value]() if value in made else value for name, value in kwargs.items()}
    q, k, v = _packed(13, 3, 16)
    cu = torch.tensor([0, 4, 4, 13], dtype=torch.int32)
    result = fused_attention.varlen_attention(q, k, v, cu, cu, 9, 9, backend="cpu", **kwargs)
    assert varlen_direct_calls == [1, 0]
    inputs = canonicalize_varlen(q, k, v, cu, cu, 9, 9, **kwargs)
    out, lse = torch.ops.fused_attention.varlen_attention.default(*varlen_op_args(inputs, sinks=True))
    if kwargs.get("return_lse"):
        assert torch.equal(result[0], out) and torch.equal(result[1], lse)
    else:
        assert torch.equal(result, out)


def test_packed_calls_that_need_autograd_or_a_mode_take_the_op(varlen_direct_calls):
    q, k, v = _packed(10, 2, 8)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    with RecordingDispatch() as recording:
        fused_attention.varlen_attention(q, k, v, cu, cu, 7, 7, backend="cpu")
    assert "fused_attention.varlen_attention.default" in recording.seen and varlen_direct_calls == [0, 1]
    qg = q.clone().requires_grad_()
    fused_attention.varlen_attention(qg, k, v, cu, cu, 7, 7, backend="cpu").sum().backward()
    assert varlen_direct_calls == [0, 1] and qg.grad is not None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused_attention.varlen_attention(q, k, v, cu, cu, 7, 7, backend="cpu")
    assert varlen_direct_calls == [1, 1]
    assert any(event.name == "fused_attention::varlen_attention" for event in prof.events())
