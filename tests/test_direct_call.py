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


@pytest.fixture
def direct_calls(monkeypatch):
    """``[taken, declined]`` counts of the direct entry."""
    counts = [0, 0]
    entry = cpu_backend._OPS.attention.direct

    def counting(*args):
        result = entry(*args)
        counts[0 if result is not None else 1] += 1
        return result

    monkeypatch.setattr(cpu_backend._OPS.attention, "direct", counting)
    return counts


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
    "kwargs", [{}, {"is_causal": True}, {"alibi_slopes": torch.rand(3)}, {"key_lengths": torch.tensor([5, 0])},
               {"sinks": torch.randn(3)}, {"window_size": (2, 1), "softcap": 3.0}],
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
