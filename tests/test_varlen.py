"""Packed (varlen) attention against the per-sequence reference, by DESIGN.md's tolerance policy."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_policy, rand

import fused_attention
from fused_attention.reference import reference_varlen_attention

LENS_Q = [5, 1, 0, 23]
LENS_K = [9, 1, 4, 17]


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _check(backend, dtype, hq, hkv, ev, **kwargs):
    cu_q, cu_k = _cu(LENS_Q), _cu(LENS_K)
    q = rand(int(cu_q[-1]), hq, 16, dtype=dtype, requires_grad=True)
    k = rand(int(cu_k[-1]), hkv, 16, dtype=dtype, requires_grad=True)
    v = rand(int(cu_k[-1]), hkv, ev, dtype=dtype, requires_grad=True)
    out, lse = fused_attention.varlen_attention(
        q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), return_lse=True, backend=backend, **kwargs
    )
    assert lse.shape == (hq, q.shape[0])
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(dtype))
    refs = {}
    for dt in (dtype, torch.float64):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = reference_varlen_attention(*leaves, cu_q, cu_k, **kwargs)
        refs[dt] = (ref_out, ref_lse, torch.autograd.grad(ref_out, leaves, upstream.to(dt)))
    (o_dt, l_dt, g_dt), (o64, l64, g64) = refs[dtype], refs[torch.float64]
    assert_policy(out, o_dt, o64, 2, "output")
    assert_policy(lse, l_dt, l64, 2, "lse")
    for name, g, a, b in zip("qkv", grads, g_dt, g64):
        assert_policy(g, a, b, 3, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"is_causal": True},
        {"window_size": (3, 1)},
        {"is_causal": True, "window_size": (4, -1), "softcap": 1.5},
        {"alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])},
        {"alibi_slopes": torch.rand(4, 4), "scale": 0.2},
    ],
    ids=lambda kw: "+".join(kw) or "plain",
)
def test_varlen_matches_reference(backend, dtype, kwargs):
    torch.manual_seed(0)
    _check(backend, dtype, 4, 4, 16, **kwargs)


def test_varlen_gqa_and_value_head_dim(backend):
    torch.manual_seed(1)
    _check(backend, torch.float32, 4, 2, 8, is_causal=True)


def test_varlen_equals_padded_dense_attention(backend):
    """One sequence of a pack equals dense attention on that sequence alone."""
    torch.manual_seed(2)
    cu_q, cu_k = _cu(LENS_Q), _cu(LENS_K)
    q, k, v = rand(int(cu_q[-1]), 2, 8), rand(int(cu_k[-1]), 2, 8), rand(int(cu_k[-1]), 2, 8)
    out = fused_attention.varlen_attention(q, k, v, cu_q, cu_k, 23, 17, backend=backend)
    b = 3
    dense = fused_attention.scaled_dot_product_attention(
        *(t[c[b] : c[b + 1]].transpose(0, 1) for t, c in ((q, cu_q), (k, cu_k), (v, cu_k))),
        window_size=(-1, 0), backend=backend,
    )
    full = fused_attention.varlen_attention(q, k, v, cu_q, cu_k, 23, 17, is_causal=True, backend=backend)
    torch.testing.assert_close(full[cu_q[b] : cu_q[b + 1]], dense.transpose(0, 1))
    assert not torch.equal(out, full)


def test_varlen_dropout_reproducible(backend):
    cu = _cu([3, 4])
    q, k, v = rand(7, 2, 8), rand(7, 2, 8), rand(7, 2, 8)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(fused_attention.varlen_attention(q, k, v, cu, cu, 4, 4, dropout_p=0.5, backend=backend))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
