"""Attention sinks with a KV cache and through the merge of partial states: split keys are computed
without the sink, which joins once, at the merge."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_policy, shared_backends

import fused_attention
from fused_attention.reference import reference_attention


def _qkv(b=2, hq=4, hkv=2, lq=3, s=29, d=16, dtype=torch.float64):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, s, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, s, d, generator=gen, dtype=dtype)
    sinks = torch.randn(hq, generator=gen, dtype=torch.float32) * 2
    return q, k, v, sinks


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_merge_with_sinks_equals_unsplit_attention(layout):
    q, k, v, sinks = _qkv()
    full, full_lse = fused_attention.scaled_dot_product_attention(
        q, k, v, enable_gqa=True, sinks=sinks, return_lse=True, backend="torch"
    )
    parts = [
        fused_attention.scaled_dot_product_attention(
            q, k[:, :, a:b], v[:, :, a:b], enable_gqa=True, return_lse=True, backend="torch"
        )
        for a, b in ((0, 11), (11, 29))
    ]
    outs = [o if layout == "bhsd" else o.transpose(1, 2) for o, _ in parts]
    out, lse = fused_attention.merge_attention_states(
        outs[0], parts[0][1], outs[1], parts[1][1], layout=layout, sinks=sinks
    )
    out = out if layout == "bhsd" else out.transpose(1, 2)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(lse, full_lse)


def test_merge_sinks_need_head_shaped_tensor():
    q, k, v, _ = _qkv()
    out, lse = fused_attention.scaled_dot_product_attention(q, k, v, enable_gqa=True, return_lse=True)
    with pytest.raises(ValueError, match="sinks"):
        fused_attention.merge_attention_states(out, lse, out, lse, sinks=torch.zeros(3))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_kvcache_sinks_equal_reference(num_splits, backend):
    if backend not in shared_backends():
        pytest.skip(f"backend {backend} cannot compute on CPU tensors here")
    # triton serves float32 here (no float64 tl.dot): held to the tolerance policy against float64
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v, sinks = _qkv(dtype=dtype)
    seqlens = torch.tensor([29, 17], dtype=torch.int32)
    out, lse = fused_attention.attention_with_kvcache(
        q, k, v, cache_seqlens=seqlens, is_causal=True, sinks=sinks, num_splits=num_splits,
        return_lse=True, layout="bhsd", backend=backend,
    )
    for b, n in enumerate(seqlens.tolist()):
        def ref(dt, b=b, n=n):
            return reference_attention(
                q[b : b + 1].to(dt), k[b : b + 1, :, :n].to(dt), v[b : b + 1, :, :n].to(dt), enable_gqa=True,
                sinks=sinks, window_size=(-1, 0),  # bottom-right causal, as the cache aligns it
            )
        (ref64, lse64), (ref_dt, lse_dt) = ref(torch.float64), ref(dtype)
        assert_policy(out[b : b + 1], ref_dt, ref64, 2.0, "out")
        assert_policy(lse[b : b + 1], lse_dt, lse64, 2.0, "lse")
