"""The ``cpu`` backend's split backward: with fewer (sequence, kv head) tasks than threads, the kernel cuts
each task into parts (query heads of the group and row steps, taken in turn) that sum dK and dV apart and
join them in part order. These cases force it (one sequence, one KV head, 2 and 3 threads) through the
shared gradient checks, and check that its results are bit-identical from call to call."""

from __future__ import annotations

import pytest
import torch
from conftest import check_attention, check_varlen, rand
from test_sinks import check_sinks

import fused_attention
from fused_attention.backends import BACKENDS

pytestmark = pytest.mark.skipif(
    BACKENDS["cpu"].unavailable_reason() is not None, reason=str(BACKENDS["cpu"].unavailable_reason())
)
HQ, L, S, E = 4, 97, 83, 40  # 97 rows: two row steps per query head


@pytest.fixture(params=[2, 3], ids=lambda n: f"{n}threads")
def threads(request):
    """More threads than the one task: 2 parts per task at 2 threads, 3 at 3."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def _qkv(hq=HQ, hkv=1, seq_q=L, seq_k=S):
    q = rand(1, hq, seq_q, E, requires_grad=True)
    k, v = (rand(1, hkv, seq_k, E, requires_grad=True) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize(
    "hq,kwargs",
    [
        (HQ, {"is_causal": True, "alibi_slopes": torch.tensor([0.3, -0.05, 0.1, 0.02]), "scale": 0.3}),
        (1, {"window_size": (30, 5), "softcap": 2.0}),  # one query head: the parts split its row steps
        (HQ, {"attn_mask": "per_head"}),  # a mask gradient the parts write apart
        (HQ, {"attn_mask": "shared", "is_causal": False}),  # broadcast over heads: the task is not split
    ],
    ids=["mqa-causal-alibi", "one-head-window-softcap", "float-mask-per-head", "float-mask-shared"],
)
def test_split_backward_matches_reference(threads, hq, kwargs):
    q, k, v = _qkv(hq=hq)
    kwargs = dict(kwargs)
    if "alibi_slopes" in kwargs:
        kwargs["alibi_slopes"] = kwargs["alibi_slopes"][:hq].clone().requires_grad_()
    if kwargs.get("attn_mask") is not None:
        heads = hq if kwargs["attn_mask"] == "per_head" else 1
        kwargs["attn_mask"] = rand(1, heads, L, S, requires_grad=True)
    check_attention("cpu", q, k, v, enable_gqa=hq > 1, **kwargs)


def test_split_backward_sink_gradients(threads):
    q, k, v = _qkv()
    sinks = (2 * torch.randn(HQ, dtype=torch.float64)).float().requires_grad_()
    check_sinks("cpu", q, k, v, sinks=sinks, enable_gqa=True, is_causal=True)


def test_split_backward_varlen(threads):
    """One packed sequence with one KV head (and an empty one): the packed op splits the same way."""
    cu_q, cu_k = torch.tensor([0, 61, 61], dtype=torch.int32), torch.tensor([0, 70, 75], dtype=torch.int32)
    q = rand(61, HQ, E, requires_grad=True)
    k, v = (rand(75, 1, E, requires_grad=True) for _ in range(2))
    check_varlen("cpu", q, k, v, cu_q, cu_k, alibi_slopes=torch.rand(HQ).requires_grad_(), window_size=(20, 0))


def test_split_backward_is_bit_identical_across_calls(threads):
    q, k, v = _qkv()
    slopes = torch.rand(HQ).requires_grad_()
    upstream = rand(1, HQ, L, E)
    results = []
    for _ in range(3):
        torch.manual_seed(5)  # the dropout mask
        out = fused_attention.scaled_dot_product_attention(
            q, k, v, enable_gqa=True, is_causal=True, alibi_slopes=slopes, dropout_p=0.1, backend="cpu"
        )
        results.append(torch.autograd.grad(out, (q, k, v, slopes), upstream))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
