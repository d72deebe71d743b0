"""The FlashAttention and xformers providers' plumbing (layouts, keyword arguments, masks, varlen),
checked on the CPU against stand-in modules built on the reference: the real packages need a GPU and are
not installed here, so this proves the wiring, not the packages."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fused_attention import bench
from fused_attention.bench import Provider, Spec
from fused_attention.bench.external import _flash_attn, _flash_attn_reasons, _xformers, _xformers_reasons
from fused_attention.reference import reference_attention, reference_varlen_attention


def _bhsd(*tensors):
    return [t.transpose(1, 2) for t in tensors]


def _fake_flash_attn() -> types.ModuleType:
    def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1), alibi_slopes=None, softcap=0.0):
        q, k, v = _bhsd(q, k, v)
        out = reference_attention(
            q, k, v, is_causal=causal, enable_gqa=True, window_size=window_size, alibi_slopes=alibi_slopes,
            softcap=softcap or None,
        )[0]
        return out.transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
        return reference_varlen_attention(q, k, v, cu_q, cu_k, is_causal=causal)[0]

    module = types.ModuleType("flash_attn")
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return module


def _fake_xformers() -> tuple[types.ModuleType, types.ModuleType]:
    class LowerTriangularMask:
        pass

    class BlockDiagonalCausalMask:
        def __init__(self, lengths):
            self.lengths = lengths

        @classmethod
        def from_seqlens(cls, lengths):
            return cls(lengths)

    def memory_efficient_attention(q, k, v, attn_bias=None):
        if isinstance(attn_bias, BlockDiagonalCausalMask):
            cu = torch.tensor([0, *attn_bias.lengths]).cumsum(0)
            return reference_varlen_attention(q[0], k[0], v[0], cu, cu, is_causal=True)[0].unsqueeze(0)
        q, k, v = _bhsd(q, k, v)
        causal = isinstance(attn_bias, LowerTriangularMask)
        mask = None if causal else attn_bias
        return reference_attention(q, k, v, attn_mask=mask, is_causal=causal)[0].transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.LowerTriangularMask, ops.memory_efficient_attention = LowerTriangularMask, memory_efficient_attention
    ops.fmha = types.SimpleNamespace(attn_bias=types.SimpleNamespace(BlockDiagonalCausalMask=BlockDiagonalCausalMask))
    package = types.ModuleType("xformers")
    package.ops = ops
    return package, ops


@pytest.fixture
def fake_packages(monkeypatch):
    package, ops = _fake_xformers()
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def test_external_providers_wire_every_op(fake_packages):
    providers = [
        Provider("flash-attn", _flash_attn, _flash_attn_reasons),
        Provider("xformers", _xformers, _xformers_reasons),
    ]
    specs = [Spec(op, 2, 4, 40, 40, 16, "bfloat16") for op in bench.ATTENTION_OPS]
    rows = bench.run(specs, providers, min_run_time=0.001)
    refused = {("flash-attn", "padding"), ("flash-attn", "mask"), ("xformers", "softcap"), ("xformers", "gqa"),
               ("flash-attn", "sinks"), ("xformers", "sinks"), ("xformers", "decode")}
    for row in rows:
        if (row.provider, row.op) in refused:
            assert row.reason and row.median_ms is None, row
        else:
            assert row.ok and row.max_error < 2e-2, row  # bfloat16: a wiring mistake is off by O(1)
    assert "float16/bfloat16" in _flash_attn_reasons(bench.make_case(Spec("plain", 1, 1, 8, 8, 8)))[0]


def test_external_providers_only_on_cuda():
    from fused_attention.bench.external import external_providers

    assert external_providers("cpu") == []
