"""Packed (varlen) attention against the per-sequence reference, by DESIGN.md's tolerance policy."""

from __future__ import annotations

import pytest
import torch
from conftest import check_varlen, rand

import fused_attention

LENS_Q = [5, 1, 0, 23]
LENS_K = [9, 1, 4, 17]


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _check(backend, dtype, hq, hkv, ev, **kwargs):
    cu_q, cu_k = _cu(LENS_Q), _cu(LENS_K)
    q = rand(int(cu_q[-1]), hq, 16, dtype=dtype, requires_grad=True)
    k = rand(int(cu_k[-1]), hkv, 16, dtype=dtype, requires_grad=True)
    v = rand(int(cu_k[-1]), hkv, ev, dtype=dtype, requires_grad=True)
    if "alibi_slopes" in kwargs:  # its gradient is checked too
        kwargs["alibi_slopes"] = kwargs["alibi_slopes"].clone().requires_grad_()
    check_varlen(backend, q, k, v, cu_q, cu_k, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"is_causal": True},
        {"window_size": (3, 1)},
        {"is_causal": True, "window_size": (4, -1), "softcap": 1.5},
        {"alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])},
        # Built at import, so from a generator of its own (the global RNG's state there depends on which test
        # modules were imported first). This draw's float32 slope gradient failed the policy (2.3x its bound)
        # where the torch backend summed dS against raw distances; any draw should pass.
        {"alibi_slopes": torch.rand(4, 4, generator=torch.Generator().manual_seed(146)), "scale": 0.2},
    ],
    ids=lambda kw: "+".join(kw) or "plain",
)
def test_varlen_matches_reference(backend, dtype, kwargs):
    torch.manual_seed(0)
    _check(backend, dtype, 4, 4, 16, **kwargs)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["slopes_H", "slopes_BH"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_varlen_alibi_slopes_gradient_matches_reference(backend, dtype, per_sequence, causal):
    """d/d(slopes) of (H,) and per-sequence (B, H) slopes, with and without causal, under GQA."""
    slopes = torch.rand(len(LENS_Q), 4) if per_sequence else torch.rand(4)
    _check(backend, dtype, 4, 2, 16, alibi_slopes=slopes * 0.5 - 0.1, is_causal=causal, scale=0.3)


def test_varlen_cu_seqlens_given_as_strided_views(backend):
    """cu_seqlens that are views with a stride (every other element of a larger tensor) read as their
    values: the triton kernels indexed them as if contiguous (out-of-bounds reads)."""
    torch.manual_seed(2)
    cu_q, cu_k = (torch.stack([_cu(lens), torch.full((len(lens) + 1,), 99, dtype=torch.int32)], 1).flatten()[::2]
                  for lens in (LENS_Q, LENS_K))
    assert cu_q.stride() == (2,) and cu_k.stride() == (2,)
    q = rand(int(cu_q[-1]), 4, 16, requires_grad=True)
    k, v = (rand(int(cu_k[-1]), 2, 16, requires_grad=True) for _ in range(2))
    check_varlen(backend, q, k, v, cu_q, cu_k, is_causal=True)


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
