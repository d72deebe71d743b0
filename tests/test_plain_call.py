"""The common CPU call's short path (``backends/plain_call.py``, the extension's ``attention_plain``):
taken by ``scaled_dot_product_attention(q, k, v)`` with at most ``is_causal``, ``scale`` and
``enable_gqa``, equal to the full path bit for bit (outputs, and gradients through its C++ autograd node),
and declined for everything the full path must see (autocast, modes, subclasses, broadcasting, bad
arguments, forward AD, a forced or patched backend)."""

from __future__ import annotations

import pytest
import torch
from conftest import RecordingDispatch
from torch.overrides import TorchFunctionMode

import fused_attention
from fused_attention.backends import BACKENDS, plain_call

pytestmark = pytest.mark.skipif(plain_call._PLAIN is None, reason="needs the compiled extension")
needs_grad_node = pytest.mark.skipif(not plain_call._GRAD_NODE, reason="torch < 2.7: gradient calls take the full path")


@pytest.fixture
def plain_calls(monkeypatch):
    """``[taken, declined]``: calls of the C++ entry that returned an output, and that returned None
    (calls that the Python side kept from it count in neither)."""
    monkeypatch.delenv("FUSED_ATTENTION_BACKEND", raising=False)
    counts = [0, 0]
    entry = plain_call._PLAIN

    def counting(*args):
        result = entry(*args)
        counts[0 if result is not None else 1] += 1
        return result

    monkeypatch.setattr(plain_call, "_PLAIN", counting)
    return counts


def _qkv(b=2, hq=4, hkv=4, lq=5, s=9, e=16, ev=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, lq, e, generator=g).to(dtype)
    k = torch.randn(b, hkv, s, e, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, ev or e, generator=g).to(dtype)
    return q, k, v


def _full(q, k, v, **kwargs):
    """The same call through every layer (a forced backend never takes the short path)."""
    return fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu", **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "case",
    [
        {},
        {"is_causal": True},
        {"scale": 0.3},
        {"enable_gqa": True, "hkv": 2},
        {"lq": 1, "s": 700, "enable_gqa": True, "hkv": 1},  # a decode step
        {"ev": 8, "is_causal": True, "lq": 12},
    ],
    ids=["plain", "causal", "scale", "gqa", "decode", "value_dim"],
)
def test_the_common_call_takes_the_short_path_and_equals_the_full_one(plain_calls, dtype, case):
    case = dict(case)
    shape = {name: case.pop(name) for name in ("hkv", "lq", "s", "ev") if name in case}
    q, k, v = _qkv(dtype=dtype, **shape)
    out = fused_attention.scaled_dot_product_attention(q, k, v, **case)
    assert plain_calls == [1, 0]
    expected = _full(q, k, v, **case)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert torch.equal(out, expected)


def test_strided_views_and_inference_mode(plain_calls):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 9, 3, 16, generator=g).transpose(1, 2) for _ in range(3))  # (B, S, H, D) storage
    with torch.inference_mode():
        out = fused_attention.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert plain_calls == [1, 0] and out.is_inference()
    assert torch.equal(out, _full(q, k, v, is_causal=True))


@needs_grad_node
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "case", [{}, {"is_causal": True, "enable_gqa": True, "hkv": 2}, {"scale": 0.3, "lq": 1, "s": 40}],
    ids=["plain", "causal_gqa", "scale_decode"],
)
def test_gradients_through_the_short_path_equal_the_full_paths(plain_calls, dtype, case):
    case = dict(case)
    shape = {name: case.pop(name) for name in ("hkv", "lq", "s") if name in case}
    tensors = _qkv(dtype=dtype, **shape)
    dout = torch.randn(tensors[0].shape[:-1] + (tensors[2].shape[-1],), generator=torch.Generator().manual_seed(2))
    grads = []
    for call in (fused_attention.scaled_dot_product_attention, _full):
        q, k, v = (t.clone().requires_grad_() for t in tensors)
        out = call(q, k, v, **case)
        out.backward(dout.to(dtype))
        grads.append((out.detach(), q.grad, k.grad, v.grad))
    assert plain_calls == [1, 0]
    for ours, full in zip(*grads):
        assert torch.equal(ours, full)


@needs_grad_node
def test_the_short_paths_gradient_checks_and_guards(plain_calls):
    q, k, v = (t.double().requires_grad_() for t in _qkv(b=1, hq=2, hkv=1, lq=3, s=5, e=4))
    assert torch.autograd.gradcheck(
        lambda q, k, v: fused_attention.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        (q, k, v),
    )
    assert plain_calls[0] > 0 and plain_calls[1] == 0
    out = fused_attention.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with torch.no_grad():
        k.add_(1.0)  # a saved input changed in place: the backward refuses, as torch's own ops do
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    q.grad = None
    taken = plain_calls[0]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fused_attention.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        out.sum().backward()
    assert plain_calls[0] == taken + 1 and "PlainAttention" in out.grad_fn.name()
    names = {event.name for event in prof.events()}
    assert {"fused_attention::attention", "fused_attention::attention_backward"} <= names and q.grad is not None
    with torch.no_grad():
        fused_attention.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert plain_calls[1] == 0


def test_autocast_and_torch_function_modes_take_the_full_path(plain_calls):
    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_attention.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and plain_calls == [0, 0]
    seen = []

    class FunctionMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with FunctionMode():
        fused_attention.scaled_dot_product_attention(q, k, v)
    assert seen and plain_calls == [0, 0]


def test_a_dispatch_mode_sees_the_op(plain_calls):
    q, k, v = _qkv()
    with RecordingDispatch() as recording:
        fused_attention.scaled_dot_product_attention(q, k, v)
    assert "fused_attention.attention.default" in recording.seen and plain_calls == [0, 1]


def test_subclasses_broadcasts_and_other_ranks_take_the_full_path(plain_calls):
    class Tagged(torch.Tensor):
        pass

    q, k, v = _qkv()
    with torch._C.DisableTorchFunctionSubclass():  # past __torch_function__: the C++ type check declines
        fused_attention.scaled_dot_product_attention(q.as_subclass(Tagged), k, v)
    assert plain_calls == [0, 1]
    out = fused_attention.scaled_dot_product_attention(q, k[:1], v[:1])  # key/value batch broadcast
    assert plain_calls == [0, 2] and torch.equal(out, _full(q, k[:1], v[:1]))
    out = fused_attention.scaled_dot_product_attention(q[0], k[0], v[0])  # 3-D
    assert plain_calls == [0, 3] and torch.equal(out, _full(q[0], k[0], v[0]))
    out = fused_attention.scaled_dot_product_attention(q, k[:, :1], v[:, :1])  # heads broadcast without GQA
    assert plain_calls == [0, 4] and torch.equal(out, _full(q, k[:, :1], v[:, :1]))
    nested = torch.nested.nested_tensor([q[0], q[1, :2]])  # ragged heads: no size(1)
    with pytest.raises(TypeError, match="nested tensors are not supported"):
        fused_attention.scaled_dot_product_attention(nested, k, v)
    assert plain_calls == [0, 5]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"k": "float64"}, "dtype"),
        ({"k": "head_dim"}, "head dim"),
        ({"v": "length"}, "sequence length"),
        ({"is_causal": 1}, "is_causal"),
        ({"enable_gqa": "yes"}, "enable_gqa"),
        ({"scale": "0.5"}, "scale"),
        ({"k": "gqa"}, "enable_gqa"),
    ],
)
def test_bad_arguments_get_the_full_paths_errors(plain_calls, bad, message):
    q, k, v = _qkv()
    kwargs = {}
    for name, what in bad.items():
        if name == "k" and what == "float64":
            k = k.double()
        elif name == "k" and what == "head_dim":
            k = k[..., :8]
        elif name == "v" and what == "length":
            v = v[:, :, :4]
        elif name == "k" and what == "gqa":
            k, v = k[:, :3], v[:, :3]
            kwargs["enable_gqa"] = True
        else:
            kwargs[name] = what
    with pytest.raises((TypeError, ValueError), match=message):
        fused_attention.scaled_dot_product_attention(q, k, v, **kwargs)
    assert plain_calls[0] == 0


def test_other_arguments_take_the_full_path(plain_calls):
    q, k, v = _qkv()
    for kwargs in ({"scale": 1}, {"dropout_p": 0}, {"window_size": (2, 0)}, {"return_lse": True},
                   {"key_lengths": torch.tensor([9, 3])}):
        out = fused_attention.scaled_dot_product_attention(q, k, v, **kwargs)
        expected = _full(q, k, v, **kwargs)
        assert torch.equal(out[0] if isinstance(out, tuple) else out, expected[0] if isinstance(expected, tuple) else expected)
    assert plain_calls == [0, 1]  # only the int scale reached the C++ check


def test_a_forced_or_patched_backend_takes_the_full_path(plain_calls, monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("FUSED_ATTENTION_BACKEND", "torch")
    fused_attention.scaled_dot_product_attention(q, k, v)
    assert plain_calls == [0, 0]
    monkeypatch.delenv("FUSED_ATTENTION_BACKEND")

    cpu = BACKENDS["cpu"]
    calls = []
    with monkeypatch.context() as patch:
        original = cpu.attention
        patch.setattr(cpu, "attention", lambda inputs: calls.append(1) or original(inputs))
        fused_attention.scaled_dot_product_attention(q, k, v)
        assert calls == [1] and plain_calls == [0, 0]
    assert cpu.unpatched()  # the patch undone: the backend is as built again
    fused_attention.scaled_dot_product_attention(q, k, v)
    assert calls == [1] and plain_calls == [1, 0]

    # a patch undone by assignment (the class's method bound again, its capabilities again) counts as none
    original, capabilities = cpu.attention, cpu.capabilities
    try:
        cpu.attention = lambda inputs: calls.append(2) or original(inputs)
        cpu.capabilities = capabilities
        assert not cpu.unpatched()
    finally:
        cpu.attention = original
    assert cpu.unpatched()
    fused_attention.scaled_dot_product_attention(q, k, v)
    assert calls == [1] and plain_calls == [2, 0]


def test_torch_compile_traces_the_full_path(plain_calls):
    q, k, v = _qkv()
    compiled = torch.compile(
        lambda q, k, v: fused_attention.scaled_dot_product_attention(q, k, v, is_causal=True), fullgraph=True,
        backend="eager",
    )
    out = compiled(q, k, v)
    assert plain_calls == [0, 0] and torch.equal(out, _full(q, k, v, is_causal=True))


def test_the_jit_tracer_and_the_profiler_see_the_op(plain_calls):
    import warnings

    q, k, v = _qkv()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice
        traced = torch.jit.trace(lambda q, k, v: fused_attention.scaled_dot_product_attention(q, k, v), (q, k, v),
                                 check_trace=False)
    assert "fused_attention::attention" in str(traced.graph) and plain_calls == [0, 1]  # declined in C++
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused_attention.scaled_dot_product_attention(q, k, v)
    assert plain_calls == [1, 1]
    assert any(event.name == "fused_attention::attention" for event in prof.events())


def test_a_class_patch_or_another_priority_takes_the_full_path(plain_calls, monkeypatch):
    from fused_attention.backends import cpu_backend, dispatch

    q, k, v = _qkv()
    calls = []
    original = cpu_backend.CpuBackend.attention
    with monkeypatch.context() as patch:
        patch.setattr(cpu_backend.CpuBackend, "attention", lambda self, inputs: calls.append(1) or original(self, inputs))
        fused_attention.scaled_dot_product_attention(q, k, v)
    with monkeypatch.context() as patch:
        patch.setitem(dispatch._PRIORITY, "cpu", ("torch", "cpu"))  # (forgets the remembered choices)
        out = fused_attention.scaled_dot_product_attention(q, k, v)
    assert calls == [1] and plain_calls == [0, 0]
    assert torch.equal(out, fused_attention.scaled_dot_product_attention(q, k, v, backend="torch"))  # torch's choice


@needs_grad_node
def test_non_reentrant_checkpointing_on_both_paths(plain_calls):
    """Non-reentrant checkpointing unpacks each saved tensor once: the full path's backward rule read them
    twice (with ALiBi, say) and failed."""
    from torch.utils.checkpoint import checkpoint

    q, k, v = (t.requires_grad_() for t in _qkv())
    for kwargs in ({"is_causal": True}, {"alibi_slopes": torch.rand(4), "sinks": torch.randn(4)}):
        out = checkpoint(lambda q, k, v, kw=kwargs: fused_attention.scaled_dot_product_attention(q, k, v, **kw),
                         q, k, v, use_reentrant=False)
        out.sum().backward()
        expected = _full(*(t.detach().requires_grad_() for t in (q, k, v)), **kwargs)
        assert torch.equal(out, expected)
    assert plain_calls[0] >= 1 and q.grad is not None


def test_forward_ad_takes_the_full_path(plain_calls):
    import torch.autograd.forward_ad as fwAD

    q, k, v = _qkv()
    q.requires_grad_()
    with fwAD.dual_level():
        dual = fwAD.make_dual(q, torch.randn_like(q))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):  # the full path's error
            fused_attention.scaled_dot_product_attention(dual, k, v)
    assert plain_calls == [0, 0]


@pytest.mark.parametrize("grad", [False, True])
def test_forward_mode_ad_raises_instead_of_a_zero_tangent(grad):
    """The ops have no jvp: a forward-mode transform raises (as torch's fused kernels do) where it had
    returned a zero tangent."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = (t.double() for t in _qkv(b=1, hq=2, hkv=2, lq=3, s=4, e=8))
    slopes = torch.rand(2)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda q: fused_attention.scaled_dot_product_attention(q, k, v), (q,), (torch.randn_like(q),))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jacfwd(lambda q: fused_attention.scaled_dot_product_attention(q, k, v, backend="torch",
                                                                                  alibi_slopes=slopes))(q)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        dual = fwAD.make_dual(q.requires_grad_(grad), torch.randn_like(q))
        fused_attention.scaled_dot_product_attention(dual, k, v)
