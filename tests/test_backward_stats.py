"""The backward given each row's lse and delta (FlashAttention's interface, which ring attention uses for
the blocks of a larger softmax), on the backends that have it (cpu, torch): against autograd of the
reference in float64, for the whole softmax and for key blocks whose gradients must add up to it."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_policy

from fused_attention.backends.base import dense_op_args
from fused_attention.backends.dispatch import BACKENDS
from fused_attention.inputs import canonicalize
from fused_attention.reference import reference_attention

_STATS_BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(
        BACKENDS[name].unavailable_reason() is not None, reason=f"the {name} backend is not available"))
    for name in ("cpu", "torch")
]


@pytest.fixture(params=_STATS_BACKENDS)
def backend(request):
    return BACKENDS[request.param]


def _plain_forward(backend, inputs):
    """The backend's own ``(out, lse)`` for these inputs (the torch backend's chunked op: its public
    forward hands plain inputs to torch's SDPA, which gives no lse)."""
    if backend.name == "torch":
        return torch.ops.fused_attention.torch_attention(*dense_op_args(inputs, sinks=True))
    return backend.attention(inputs)


FEATURES = {
    "plain": {}, "causal": {"is_causal": True}, "window": {"window_size": (7, 3)}, "softcap": {"softcap": 2.0},
    "alibi": {"alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])}, "gqa": {"enable_gqa": True},
}


def _case(feature: str, dtype=torch.float64):
    gen = torch.Generator().manual_seed(len(feature))
    hkv = 2 if feature == "gqa" else 4
    q = torch.randn(2, 4, 37, 32, generator=gen, dtype=dtype)
    k, v = (torch.randn(2, hkv, 45, 32, generator=gen, dtype=dtype) for _ in range(2))
    dout = torch.randn(2, 4, 37, 32, generator=gen, dtype=dtype)
    return q, k, v, dout, FEATURES[feature]


def _reference_grads(q, k, v, dout, kwargs, mask=None):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, attn_mask=mask, **kwargs)
    out.backward(dout.double())
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def _inputs(q, k, v, kwargs, mask=None):
    return canonicalize(q, k, v, mask, 0.0, kwargs.get("is_causal", False), None, kwargs.get("enable_gqa", False),
                        **{n: x for n, x in kwargs.items() if n not in ("is_causal", "enable_gqa")})


@pytest.mark.parametrize("feature", FEATURES)
def test_whole_softmax_matches_autograd(feature, backend):
    q, k, v, dout, kwargs = _case(feature)
    out, lse, expected = _reference_grads(q, k, v, dout, kwargs)
    delta = (dout * out).sum(-1)
    grads = backend.attention_backward_from_stats(_inputs(q, k, v, kwargs), dout, lse, delta)
    for got, want, name in zip(grads, expected, ("dq", "dk", "dv"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("feature", ["plain", "causal", "alibi", "softcap"])
def test_key_blocks_add_up_to_the_whole(feature, backend):
    """Keys cut in two by bool masks: each block's call, given the whole softmax's lse and delta, gives
    the block's share: dq adds up, and each key's dk, dv come from the block that holds it."""
    q, k, v, dout, kwargs = _case(feature)
    out, lse, (dq, dk, dv) = _reference_grads(q, k, v, dout, kwargs)
    delta = (dout * out).sum(-1)
    first = torch.zeros(37, 45, dtype=torch.bool)
    first[:, :20] = True
    total = torch.zeros_like(dq)
    for keys in (first, ~first):
        causal = torch.ones(37, 45, dtype=torch.bool).tril() if kwargs.get("is_causal") else True  # top-left, as torch
        rest = {n: x for n, x in kwargs.items() if n != "is_causal"}
        gq, gk, gv = backend.attention_backward_from_stats(_inputs(q, k, v, rest, keys & causal), dout, lse, delta)
        total += gq
        held = keys[0]
        torch.testing.assert_close(gk[:, :, held], dk[:, :, held], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gv[:, :, held], dv[:, :, held], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(total, dq, rtol=1e-10, atol=1e-10)


def test_float32_by_the_tolerance_policy(backend):
    """float32 gradients against the reference's gradients in float32 and float64 (DESIGN.md's policy)."""
    q, k, v, dout, kwargs = _case("causal", torch.float32)
    out, lse, expected = _reference_grads(q, k, v, dout, kwargs)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    reference_attention(*leaves, **kwargs)[0].backward(dout)  # the same computation in float32
    delta = (dout.double() * out).sum(-1)
    grads = backend.attention_backward_from_stats(_inputs(q, k, v, kwargs), dout, lse.float(), delta.float())
    for got, in_float32, want, name in zip(grads, [t.grad for t in leaves], expected, ("dq", "dk", "dv"), strict=True):
        assert got.dtype == torch.float32
        assert_policy(got, in_float32, want, 2.0, name)


def test_statistics_of_the_wrong_shape_are_refused(backend):
    q, k, v, dout, kwargs = _case("plain")
    lse = torch.zeros(2, 4, 36, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"lse and delta must be \(B, Hq, L\)"):
        backend.attention_backward_from_stats(_inputs(q, k, v, kwargs), dout, lse, lse)


def test_upstream_gradient_of_the_wrong_shape_is_refused(backend):
    q, k, v, dout, kwargs = _case("plain")
    lse = torch.zeros(2, 4, 37, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"dout must be \(B, Hq, L, Ev\)"):
        backend.attention_backward_from_stats(_inputs(q, k, v, kwargs), dout[:, :, :1], lse, lse)


def _draw(length: int, dtype, q_scale: float = 1.0, heads=(4, 2)):
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(1, heads[0], length, 16, generator=gen) * q_scale
    k, v = (torch.randn(1, heads[1], length + 5, 16, generator=gen) for _ in range(2))
    dout = torch.randn(1, heads[0], length, 16, generator=gen)
    return tuple(t.to(dtype) for t in (q, k, v, dout))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_precise_lse_holds_what_float32_cannot(dtype, backend):
    """``attention_precise_lse``: the output of ``attention`` bit for bit (both blocked: more than 16 rows),
    and a float64 lse within a few float32 roundings of the row's sum at scores near a thousand, where
    float32's own lse is off by up to half its spacing there (3e-5). Small integers for q and k: their
    scores are exact in float32, so the float64 reference's lse is that of the kernel's own scores."""
    q, k, v, _ = _draw(19, dtype, q_scale=6.0)
    q, k = q.round(), k.round() * 6
    inputs = canonicalize(q, k, v, None, 0.0, True, 1.0, True)
    out, lse = backend.attention_precise_lse(inputs)
    plain_out, plain_lse = _plain_forward(backend, inputs)
    assert lse.dtype == torch.float64 and torch.equal(out, plain_out)
    want = reference_attention(*(t.double() for t in (q, k, v)), is_causal=True, scale=1.0, enable_gqa=True)[1]
    assert want.abs().max() > 512
    assert (lse - want).abs().max() < 2e-6
    assert (plain_lse.double() - want).abs().max() > 2e-6  # (what the test is about)


STATS_FEATURES = {
    "causal": {"is_causal": True}, "window": {"window_size": (5, 2)},
    "alibi": {"alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625]), "is_causal": True},
    "softcap": {"softcap": 50.0},
}


@pytest.mark.parametrize("length", [12, 40])  # the decode forward's row counts, and the blocked forward's
@pytest.mark.parametrize("feature", STATS_FEATURES)
def test_backward_from_the_precise_forward_keeps_the_policy(feature, length, backend):
    """Ring attention's pair: the forward's float64 lse, then the backward from it, at scores of a few tens
    (scale 6): float32 gradients by the tolerance policy. The lse must come from scores rounded as the
    backward rounds them: from the decode forward's, dv missed the bound by 3-6x."""
    q, k, v, dout = _draw(length, torch.float32)
    kwargs = dict(STATS_FEATURES[feature], scale=6.0, enable_gqa=True)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    out64, _ = reference_attention(*leaves64, **kwargs)
    expected = torch.autograd.grad(out64, leaves64, dout.double())
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    in_float32 = torch.autograd.grad(reference_attention(*leaves, **kwargs)[0], leaves, dout)
    rest = {n: x for n, x in kwargs.items() if n not in ("is_causal", "scale", "enable_gqa")}
    inputs = canonicalize(q, k, v, None, 0.0, kwargs.get("is_causal", False), 6.0, True, **rest)
    out, lse = backend.attention_precise_lse(inputs)
    delta = (dout * out).sum(-1)
    grads = backend.attention_backward_from_stats(inputs, dout, lse, delta)
    for got, mid, want, name in zip(grads, in_float32, expected, ("dq", "dk", "dv"), strict=True):
        assert_policy(got, mid, want, 3.0, name)
