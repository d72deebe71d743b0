"""functorch's reverse-mode transforms through the positional-encoding functions: ``torch.func.grad``,
``vjp``, ``jacrev`` and per-sample gradients (``vmap`` of ``grad``) give the gradients ``torch.autograd``
gives on every position backend (the cpu and triton ops raised: functorch refuses torch.library's
autograd, which has no separate ``setup_context``); a second derivative and forward mode raise on the
kernel backends instead of returning a wrong derivative."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import rand
from test_position import position_backends

import fused_attention


@pytest.fixture(params=position_backends())
def pbackend(request) -> str:
    return request.param


def _calls(backend: str, batch: int = 2, seq: int = 5, heads: int = 3):
    """``(name, fn, inputs)``: each positional function as a function of the tensors it differentiates."""
    cos, sin = fused_attention.rotary_cos_sin(16, 6)
    yield "rotary", lambda x: fused_attention.apply_rotary_emb(x, cos, sin, seqlen_offsets=2, backend=backend), (
        rand(batch, heads, seq, 8),)
    # in place, into a copy (a leaf that requires grad cannot be written): its own autograd.Function
    yield "rotary_inplace", lambda x: fused_attention.apply_rotary_emb(
        x * 1.0, cos, sin, seqlen_offsets=2, inplace=True, backend=backend), (rand(batch, heads, seq, 8),)
    yield "rotary_qk", lambda q, k: fused_attention.apply_rotary_emb_qk(
        q, k, cos, sin, interleaved=True, layout="bshd", backend=backend), (rand(batch, seq, heads, 8),
                                                                             rand(batch, seq, 1, 8))
    yield "sinusoidal", lambda x: fused_attention.add_sinusoidal_position_encoding(
        x, batch_first=True, offset=3, backend=backend), (rand(batch, seq, 8),)


def _loss(fn):
    def loss(*tensors):
        out = fn(*tensors)
        return sum(o.square().sum() for o in (out if isinstance(out, tuple) else (out,)))

    return loss


def _autograd(fn, inputs, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [o.detach() for o in outs], torch.autograd.grad(outs, leaves, upstream)


def test_grad_and_vjp_equal_autograd(pbackend):
    for name, fn, inputs in _calls(pbackend):
        argnums = tuple(range(len(inputs)))
        got = torch.func.grad(_loss(fn), argnums=argnums)(*inputs)
        _, expected = _autograd(_loss(fn), inputs, None)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), name

        out, pullback = torch.func.vjp(fn, *inputs)
        outs = out if isinstance(out, tuple) else (out,)
        upstream = [torch.randn_like(o) for o in outs]
        expected_out, expected = _autograd(fn, inputs, upstream)
        assert all(torch.equal(a, b) for a, b in zip(outs, expected_out)), name
        got = pullback(tuple(upstream) if isinstance(out, tuple) else upstream[0])
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), name


def test_jacrev(pbackend):
    for name, fn, inputs in _calls(pbackend, batch=1, seq=2, heads=1):  # (a vmap over every output element)
        first = lambda x, fn=fn, rest=inputs[1:]: fn(x, *rest)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's per-sample fallback over the kernels: a performance note
            jac = torch.func.jacrev(first)(inputs[0])
        expected = torch.autograd.functional.jacobian(first, inputs[0])
        assert all(torch.equal(a, b) for a, b in zip(jac if isinstance(jac, tuple) else (jac,),
                                                      expected if isinstance(expected, tuple) else (expected,))), name


def test_per_sample_gradients(pbackend):
    for name, fn, inputs in _calls(pbackend):
        sample_loss = lambda *xs, fn=fn: _loss(fn)(*(x[None] for x in xs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_sample = torch.func.vmap(torch.func.grad(sample_loss, argnums=tuple(range(len(inputs)))))(*inputs)
        for i in range(inputs[0].shape[0]):
            want = _autograd(sample_loss, [x[i] for x in inputs], None)[1]
            assert all(torch.equal(got[i], w) for got, w in zip(per_sample, want)), name


def test_second_derivatives_and_forward_mode_raise_on_the_kernels(pbackend):
    if pbackend == "torch":
        pytest.skip("plain PyTorch: every transform is torch's own")
    for name, fn, inputs in _calls(pbackend):
        first = lambda x, fn=fn, rest=inputs[1:]: fn(x, *rest)
        with pytest.raises(NotImplementedError, match="second derivative"):
            torch.func.grad(lambda x, first=first: torch.func.grad(_loss(first))(x).sum())(inputs[0])
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            torch.func.jvp(first, (inputs[0],), (torch.randn_like(inputs[0]),))


def test_dual_tensors_through_the_in_place_rotation(pbackend):
    """torch.autograd.forward_ad without functorch: the in-place rotation's tangent went through unrotated
    on every backend (the in-place ops have no forward derivative). The torch backend's now follows its
    out-of-place math; the kernels' raise, as their out-of-place ops do."""
    import torch.autograd.forward_ad as fwAD

    cos, sin = fused_attention.rotary_cos_sin(16, 6)
    x, tangent = rand(2, 3, 5, 8), rand(2, 3, 5, 8)
    expected = fused_attention.apply_rotary_emb(tangent, cos, sin, backend="torch")
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.clone(), tangent)
        if pbackend != "torch":
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                fused_attention.apply_rotary_emb(dual, cos, sin, inplace=True, backend=pbackend)
            return
        out = fused_attention.apply_rotary_emb(dual, cos, sin, inplace=True, backend=pbackend)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, expected, rtol=1e-6, atol=1e-6)
