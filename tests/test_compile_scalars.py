"""Python scalars that torch.compile traces symbolically pass the argument checks unspecialized, under
fullgraph=True: ``max_seqlen`` (a new value must not recompile; a 0-d tensor computed inside the compiled
region is an unbacked SymInt), ``softcap`` and ``base`` (math.isinf / math.isfinite cannot be traced on a
SymFloat). Eager calls keep their errors.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import fused_attention as fa
from fused_attention.nn import PositionalEncoding

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
        assert torch.equal(compiled(*args), _varlen(*args))
    # (graphs, not frames: Dynamo's restart for the symbolic default dropout_p compiles a frame twice)
    assert counters["stats"]["unique_graphs"] == 1


def _traces_index_of_a_tensor() -> bool:
    """Whether this torch's Dynamo traces ``operator.index`` of a 0-d tensor computed in the graph (torch 2.6's
    raises "unsupported index(tensor)")."""
    import operator

    def fn(x, t):
        return x * operator.index(t.max())

    try:
        torch.compile(fn, backend="aot_eager", fullgraph=True)(torch.ones(2), torch.tensor([1, 3]))
    except torch._dynamo.exc.Unsupported:
        return False
    finally:
        torch._dynamo.reset()
    return True


def test_varlen_max_seqlen_from_a_tensor_inside_the_compiled_region():
    """flash_attn's habit: max_seqlen as ``(cu[1:] - cu[:-1]).max()``, an unbacked SymInt when traced."""
    if not _traces_index_of_a_tensor():
        pytest.skip("this torch's Dynamo cannot trace operator.index of a traced tensor")

    def fn(q, k, v, cu):
        return _varlen(q, k, v, cu, (cu[1:] - cu[:-1]).max())

    compiled = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for lengths in ([4, 9, 2], [7, 1, 5]):
        args = _packed(lengths, gen)
        assert torch.equal(compiled(*args), fn(*args))


def _sdpa(q, k, v, softcap):
    return fa.scaled_dot_product_attention(q, k, v, softcap=softcap)


def _varlen_softcap(q, k, v, softcap):
    cu = torch.tensor([0, 2, q.shape[0]], dtype=torch.int32)
    return fa.varlen_attention(q, k, v, cu, cu, q.shape[0] - 2, q.shape[0] - 2, softcap=softcap)


def _kvcache_softcap(q, k, v, softcap):
    return fa.attention_with_kvcache(q, k, v, softcap=softcap)


@pytest.mark.parametrize(
    "fn, shape",
    [(_sdpa, (1, H, 5, D)), (_varlen_softcap, (7, H, D)), (_kvcache_softcap, (1, 5, H, D))],
    ids=["sdpa", "varlen", "kvcache"],
)
def test_softcap_traced_symbolically(fn, shape):
    """The second value recompiles with softcap a SymFloat, which the check must take."""
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(*shape, generator=gen) for _ in range(3))
    for softcap in (30.0, 50.0, 7.5):
        assert torch.equal(compiled(q, k, v, softcap), fn(q, k, v, softcap))


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: fa.add_sinusoidal_position_encoding(x),
        lambda x: x + fa.sinusoidal_position_encoding(x.shape[1], x.shape[2]),
        lambda x: torch.cat(fa.rotary_cos_sin(x.shape[1], x.shape[2]), dim=-1),
        PositionalEncoding(16, batch_first=True),
    ],
    ids=["add_sinusoidal", "sinusoidal_table", "rotary_cos_sin", "PositionalEncoding"],
)
def test_default_base_traced_symbolically(fn):
    """With dynamic=True the default ``base=10000.0`` is a SymFloat."""
    compiled = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(compiled(x), fn(x))


def test_base_argument_traced_symbolically():
    def fn(x, base):
        return fa.add_sinusoidal_position_encoding(x, base=base)

    compiled = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(4))
    for base in (10000.0, 500.0, 2.5):
        assert torch.equal(compiled(x, base), fn(x, base))


@pytest.mark.parametrize("softcap", [float("inf"), float("-inf"), float("nan"), 0.0, -2.0])
def test_eager_bad_softcap_keeps_its_error(softcap):
    q = torch.randn(1, H, 3, D)
    with pytest.raises(ValueError, match=r"softcap must be a finite float > 0, got"):
        fa.scaled_dot_product_attention(q, q, q, softcap=softcap)


@pytest.mark.parametrize("value", [-1, torch.tensor(-2)], ids=["int", "tensor"])
def test_eager_negative_max_seqlen_keeps_its_error(value):
    q, k, v, cu = _packed([3, 2], torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"max_seqlen_q must be a non-negative int, got"):
        fa.varlen_attention(q, k, v, cu, cu, value, 3)
