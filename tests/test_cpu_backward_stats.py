"""The cpu backend's backward given each row's lse and delta (FlashAttention's interface, which ring
attention uses for the blocks of a larger softmax): against autograd of the reference in float64, for
the whole softmax and for key blocks whose gradients must add up to it."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_policy

from fused_attention.backends.dispatch import BACKENDS
from fused_attention.inputs import canonicalize
from fused_attention.reference import reference_attention

pytestmark = pytest.mark.skipif(BACKENDS["cpu"].unavailable_reason() is not None, reason="the cpu backend is not built")
CPU = BACKENDS["cpu"]
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
def test_whole_softmax_matches_autograd(feature):
    q, k, v, dout, kwargs = _case(feature)
    out, lse, expected = _reference_grads(q, k, v, dout, kwargs)
    delta = (dout * out).sum(-1)
    grads = CPU.attention_backward_from_stats(_inputs(q, k, v, kwargs), dout, lse, delta)
    for got, want, name in zip(grads, expected, ("dq", "dk", "dv"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("feature", ["plain", "causal", "alibi", "softcap"])
def test_key_blocks_add_up_to_the_whole(feature):
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
        gq, gk, gv = CPU.attention_backward_from_stats(_inputs(q, k, v, rest, keys & causal), dout, lse, delta)
        total += gq
        held = keys[0]
        torch.testing.assert_close(gk[:, :, held], dk[:, :, held], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gv[:, :, held], dv[:, :, held], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(total, dq, rtol=1e-10, atol=1e-10)


def test_float32_by_the_tolerance_policy():
    """float32 gradients against the reference's gradients in float32 and float64 (DESIGN.md's policy)."""
    q, k, v, dout, kwargs = _case("causal", torch.float32)
    out, lse, expected = _reference_grads(q, k, v, dout, kwargs)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    reference_attention(*leaves, **kwargs)[0].backward(dout)  # the same computation in float32
    delta = (dout.double() * out).sum(-1)
    grads = CPU.attention_backward_from_stats(_inputs(q, k, v, kwargs), dout, lse.float(), delta.float())
    for got, in_float32, want, name in zip(grads, [t.grad for t in leaves], expected, ("dq", "dk", "dv"), strict=True):
        assert got.dtype == torch.float32
        assert_policy(got, in_float32, want, 2.0, name)


def test_statistics_of_the_wrong_shape_are_refused():
    q, k, v, dout, kwargs = _case("plain")
    lse = torch.zeros(2, 4, 36, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"lse and delta must be \(B, Hq, L\)"):
        CPU.attention_backward_from_stats(_inputs(q, k, v, kwargs), dout, lse, lse)


def test_upstream_gradient_of_the_wrong_shape_is_refused():
    q, k, v, dout, kwargs = _case("plain")
    lse = torch.zeros(2, 4, 37, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"dout must be \(B, Hq, L, Ev\)"):
        CPU.attention_backward_from_stats(_inputs(q, k, v, kwargs), dout[:, :, :1], lse, lse)
