"""functorch's reverse-mode transforms through the attention ops: ``torch.func.grad``, ``vjp``, ``jacrev``
and per-sample gradients (``vmap`` of ``grad``) give the gradients ``torch.autograd`` gives, on every
backend; a nested reverse-mode transform (a second derivative) and forward mode raise instead of
returning a wrong derivative."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import rand, require

import fused_attention
from fused_attention.backends.plain_call import _GRAD_NODE


def _attend(backend: str, **kwargs):
    return lambda q, k, v: fused_attention.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)


def _autograd(fn, *tensors, upstream=None):
    """``(output, gradients)`` of ``fn`` by torch.autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, upstream if upstream is not None else torch.ones_like(out))


@pytest.mark.parametrize("kwargs", [{"is_causal": True}, {"enable_gqa": True, "alibi_slopes": "slopes"}],
                         ids=["causal", "gqa_alibi"])
def test_grad_and_vjp_equal_autograd(backend, kwargs):
    require(backend, torch.float32)
    q, k, v = rand(1, 4, 9, 16), rand(1, 2 if kwargs.get("enable_gqa") else 4, 11, 16), rand(1, 2 if kwargs.get(
        "enable_gqa") else 4, 11, 16)
    if kwargs.get("alibi_slopes"):
        kwargs = {**kwargs, "alibi_slopes": torch.rand(4) + 0.1}
    attend = _attend(backend, **kwargs)
    _, expected = _autograd(lambda *t: attend(*t).square().sum(), q, k, v)
    got = torch.func.grad(lambda *t: attend(*t).square().sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))

    upstream = rand(1, 4, 9, 16)
    out, pullback = torch.func.vjp(attend, q, k, v)
    expected_out, expected = _autograd(attend, q, k, v, upstream=upstream)
    assert torch.equal(out, expected_out)
    assert all(torch.equal(a, b) for a, b in zip(pullback(upstream), expected))


def test_jacrev_equals_the_autograd_jacobian(backend):
    require(backend, torch.float32)
    q, k, v = rand(1, 1, 3, 8), rand(1, 1, 4, 8), rand(1, 1, 4, 8)
    attend = _attend(backend, is_causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's per-sample fallback over the backward op: a performance note
        jac = torch.func.jacrev(attend, argnums=1)(q, k, v)
    expected = torch.autograd.functional.jacobian(lambda k: attend(q, k, v), k)
    assert torch.equal(jac, expected)
    assert jac.abs().max() > 0


def test_per_sample_gradients(backend):
    """vmap over the batch of grad of one sample's loss: Opacus-style per-sample gradients."""
    require(backend, torch.float32)
    q, k, v = rand(3, 2, 5, 8), rand(3, 2, 7, 8), rand(3, 2, 7, 8)

    def loss(q1, k1, v1):
        return fused_attention.scaled_dot_product_attention(q1[None], k1[None], v1[None], is_causal=True,
                                                            backend=backend).square().sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for i in range(3):
        _, expected = _autograd(loss, q[i], k[i], v[i])
        for got, want in zip(grads, expected):
            assert torch.equal(got[i], want)


def test_vmap_over_per_sample_key_lengths(backend):
    """Checks that read an argument's values stand aside where there are none to read: vmap over key lengths
    raised (vmap cannot read a batched tensor's value)."""
    require(backend, torch.float32)
    q, k, v = rand(2, 2, 5, 8), rand(2, 2, 7, 8), rand(2, 2, 7, 8)
    lengths = torch.tensor([[7, 3], [5, 2]])

    def attend(key_lengths):
        return fused_attention.scaled_dot_product_attention(q, k, v, key_lengths=key_lengths, backend=backend)

    got = torch.func.vmap(attend)(lengths)
    for i in range(2):
        assert torch.equal(got[i], attend(lengths[i]))


def test_shapes_propagate_through_fake_tensors():
    """Shape propagation (FakeTensorMode) through the calls whose checks read values: key lengths, RoPE
    offsets, cu_seqlens, cache lengths (each raised DataDependentOutputException)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(1, 2, 5, 8)
        assert fused_attention.apply_rotary_emb(x, torch.randn(16, 4), torch.randn(16, 4),
                                                seqlen_offsets=torch.tensor([1])).shape == x.shape
        packed = torch.randn(6, 2, 8)
        assert fused_attention.varlen_attention(packed, packed, packed, cu, cu, 4, 4).shape == packed.shape
        q, kv = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 7, 8)
        out = fused_attention.scaled_dot_product_attention(q, kv, kv, key_lengths=torch.tensor([7, 3]))
        assert out.shape == q.shape
        cache = torch.randn(2, 9, 2, 8)
        out = fused_attention.attention_with_kvcache(torch.randn(2, 1, 2, 8), cache, cache.clone(),
                                                     cache_seqlens=torch.tensor([4, 9], dtype=torch.int32))
        assert out.shape == (2, 1, 2, 8)


def _functorch_reads_values() -> bool:
    """Whether this torch's functorch lets a transformed function read a tensor's values (``tolist``), which
    varlen_attention does for ``cu_seqlens``: torch 2.14's does, torch 2.6's raises "Cannot access data
    pointer of Tensor that doesn't have storage"."""
    offsets = torch.tensor([0, 1])
    try:
        torch.func.grad(lambda x: x.sum() * len(offsets.tolist()))(torch.ones(2))
    except RuntimeError:
        return False
    return True


def test_varlen_grad_equals_autograd(backend):
    require(backend, torch.float32)
    if not _functorch_reads_values():
        pytest.skip("this torch's functorch cannot read cu_seqlens' values inside a transform")
    q, k, v = rand(10, 2, 16), rand(12, 2, 16), rand(12, 2, 16)
    cu_q, cu_k = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32)

    def loss(q, k, v):
        return fused_attention.varlen_attention(q, k, v, cu_q, cu_k, 6, 7, is_causal=True,
                                                backend=backend).square().sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(got, _autograd(loss, q, k, v)[1]))


def test_second_derivatives_and_forward_mode_raise(backend):
    require(backend, torch.float32)
    q, k, v = rand(1, 1, 3, 8), rand(1, 1, 4, 8), rand(1, 1, 4, 8)
    attend = _attend(backend)

    def first(q):
        return torch.func.grad(lambda q: attend(q, k, v).square().sum())(q)

    with pytest.raises(NotImplementedError, match="second derivative"):
        torch.func.grad(lambda q: first(q).sum())(q)
    with pytest.raises(NotImplementedError, match="second derivative"):
        torch.func.jacrev(first)(q)
    # (ours, or torch's own where the torch backend hands a plain call to torch's SDPA)
    with pytest.raises((NotImplementedError, RuntimeError), match="forward-mode AD|forward AD"):
        torch.func.jvp(lambda q: attend(q, k, v), (q,), (torch.randn_like(q),))


@pytest.mark.parametrize("path", ["backend", "plain", "varlen"])
def test_a_second_derivative_through_create_graph_raises(backend, path):
    """A gradient taken with ``create_graph=True`` equals the plain one, and a second derivative through it
    (a gradient penalty, alone or next to other terms) raises, as torch's kernels without a derivative
    do. The cpu backend's ops and the short path's node gave the penalty's attention term 0 (torch's
    fallback only warned; the node's gradients carried no graph)."""
    require(backend, torch.float32)
    if path == "plain" and backend != "cpu":
        pytest.skip("the short path is the cpu backend's")
    q, k, v = rand(1, 2, 3, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    cu_k = torch.tensor([0, 5], dtype=torch.int32)

    def attend(q):
        if path == "varlen":
            packed = [t[0].transpose(0, 1) for t in (q, k, v)]
            return fused_attention.varlen_attention(*packed, cu, cu_k, 3, 5, backend=backend)
        return fused_attention.scaled_dot_product_attention(q, k, v, backend=None if path == "plain" else backend)

    for mixed in (False, True):
        leaf = q.clone().requires_grad_()
        with warnings.catch_warnings():
            # torch's fallback for an op without an autograd kernel only warned ("... silently incorrect")
            warnings.filterwarnings("error", message=".*autograd kernel was not registered")
            (first,) = torch.autograd.grad(attend(leaf).square().sum(), leaf, create_graph=True)
        (plain,) = torch.autograd.grad(attend(leaf).square().sum(), leaf)
        assert torch.equal(first.detach(), plain)
        if path == "plain" and _GRAD_NODE:  # the short path's C++ node served it, and its Error node
            assert "PlainAttention" in attend(leaf).grad_fn.name() and first.grad_fn.name().endswith("Error")
        penalty = first.square().sum() + (leaf.sum() if mixed else 0)
        with pytest.raises(RuntimeError, match="no derivative of their own"):
            torch.autograd.grad(penalty, leaf)
