"""Python scalars that torch.compile traces symbolically pass the argument checks unspecialized, under
fullgraph=True: ``max_seqlen`` (a new value must not recompile; a 0-d tensor computed inside the compiled
region is an unbacked SymInt). Eager calls keep their errors.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import fused_attention as fa

H, D = 2, 8


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _packed(lengths: list[int], gen: torch.Generator):
    """q, k, v ``(total, H, D)`` and int32 ``cu_seqlens`` for sequences of ``lengths``."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    q, k, v = (torch.randn(total, H, D, generator=gen) for _ in range(3))
    return q, k, v, cu


def _varlen(q, k, v, cu, max_len):
    return fa.varlen_attention(q, k, v, cu, cu, max_len, max_len, is_causal=True)


def test_varlen_max_seqlen_compiles_once():
    """Ten longest lengths, one graph (operator.index pinned each value: a recompile each, and
    FailOnRecompileLimitHit under fullgraph after 8)."""
    counters.clear()
    compiled = torch.compile(_varlen, backend="aot_eager", dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    for longest in range(5, 15):
        lengths = [3, longest, 1]
        args = (*_packed(lengths, gen), max(lengths))
        torch.testing.assert_close(compiled(*args), _varlen(*args), rtol=1e-5, atol=1e-6)
    # (graphs, not frames: Dynamo's restart for the symbolic default dropout_p compiles a frame twice)
    assert counters["stats"]["unique_graphs"] == 1


def test_varlen_max_seqlen_from_a_tensor_inside_the_compiled_region():
    """flash_attn's habit: max_seqlen as ``(cu[1:] - cu[:-1]).max()``, an unbacked SymInt when traced."""

    def fn(q, k, v, cu):
        return _varlen(q, k, v, cu, (cu[1:] - cu[:-1]).max())

    compiled = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for lengths in ([4, 9, 2], [7, 1, 5]):
        args = _packed(lengths, gen)
        torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [-1, torch.tensor(-2)], ids=["int", "tensor"])
def test_eager_negative_max_seqlen_keeps_its_error(value):
    q, k, v, cu = _packed([3, 2], torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"max_seqlen_q must be a non-negative int, got"):
        fa.varlen_attention(q, k, v, cu, cu, value, 3)
