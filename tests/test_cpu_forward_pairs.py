"""The ``cpu`` backend's forward with tasks that own a (sequence, kv head) pair: with at least four pairs
per thread and small K/V tiles, each task packs its pair's K and V into its own cache and runs every
row block of every query head of the group against it (the encoder's many short sequences). These
cases force it (one thread, four or more pairs, more than 16 query rows so that the decode path does not
serve them) through the shared checks, and check that it gives the same bits as the shared-tile path
that more threads take for the same call."""

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
B, HQ, HKV, L, S, E = 2, 4, 2, 37, 45, 24  # 4 pairs: the pair path at 1 thread, the shared path at 2+


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _qkv(dtype=torch.float32, b=B, hq=HQ, hkv=HKV, seq_q=L, seq_k=S, grad=True):
    q = rand(b, hq, seq_q, E, dtype=dtype, requires_grad=grad)
    k, v = (rand(b, hkv, seq_k, E, dtype=dtype, requires_grad=grad) for _ in range(2))
    return q, k, v


FEATURES = {
    "plain": {},
    "causal": {"is_causal": True},
    "window-softcap": {"window_size": (9, 3), "softcap": 3.0},
    "alibi": {"alibi_slopes": "slopes", "scale": 0.4},
    "key-lengths": {"key_lengths": torch.tensor([45, 20])},
    "float-mask": {"attn_mask": "mask"},
    "bool-mask": {"attn_mask": "bool"},
}


def _kwargs(name: str) -> dict:
    kwargs = dict(FEATURES[name])
    if kwargs.get("alibi_slopes") == "slopes":
        kwargs["alibi_slopes"] = torch.tensor([0.3, -0.05, 0.1, 0.02], requires_grad=True)
    if kwargs.get("attn_mask") == "mask":
        kwargs["attn_mask"] = rand(B, HQ, L, S, requires_grad=True)
    elif kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.rand(B, 1, L, S) > 0.3
    return kwargs


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_pair_tasks_match_the_reference(one_thread, feature):
    q, k, v = _qkv()
    check_attention("cpu", q, k, v, enable_gqa=True, **_kwargs(feature))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_pair_tasks_in_every_dtype(one_thread, dtype):
    q, k, v = _qkv(dtype)
    check_attention("cpu", q, k, v, enable_gqa=True, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16: the AMX forward where there is one
def test_pair_tasks_several_row_blocks(one_thread, dtype):
    """More rows than one block (240): a task runs each block of each head against the pair it packed."""
    q, k, v = _qkv(dtype, b=2, hq=2, hkv=2, seq_q=260, seq_k=250)
    check_attention("cpu", q, k, v, is_causal=True, window_size=(100, 0))


def test_pair_tasks_with_sinks(one_thread):
    q, k, v = _qkv()
    sinks = (2 * torch.randn(HQ, dtype=torch.float64)).float().requires_grad_()
    check_sinks("cpu", q, k, v, sinks=sinks, enable_gqa=True, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pair_tasks_packed_sequences(one_thread, dtype):
    """Varlen: pairs are (sequence, kv head) of sequences with different lengths, one of them empty."""
    lens_q, lens_k = [30, 0, 19, 41], [33, 5, 19, 60]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = rand(sum(lens_q), HQ, E, dtype=dtype, requires_grad=True)
    k, v = (rand(sum(lens_k), HKV, E, dtype=dtype, requires_grad=True) for _ in range(2))
    check_varlen("cpu", q, k, v, cu_q, cu_k, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature", ["plain", "causal", "alibi"])
def test_pair_tasks_give_the_shared_paths_bits(feature, dtype):
    """The same call at 1 thread (4 pairs: pair tasks) and at 2 and 3 threads (fewer than 4 pairs per
    thread: shared tiles) gives identical outputs and lse: each row's arithmetic is the same either way."""
    q, k, v = _qkv(dtype, grad=False)
    kwargs = {n: t.detach() if isinstance(t, torch.Tensor) else t for n, t in _kwargs(feature).items()}
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fused_attention.scaled_dot_product_attention(
                q, k, v, backend="cpu", enable_gqa=True, return_lse=True, **kwargs))
    finally:
        torch.set_num_threads(saved)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tasks_of_unequal_cost_on_several_threads(threads, dtype):
    """A packed batch sorted by length: the threads take runs of (sequence, kv head) tasks of equal cost
    (parallel_for_balanced), so one run holds the long sequence's tasks and another many short ones;
    forward and backward must still run every task once (the suite's workers run one thread)."""
    lengths = [300, 200, 120, 64, 40, 30, 24, 20]  # 16 pairs with 2 kv heads: the pair path up to 4 threads
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    gen = torch.Generator().manual_seed(9)
    q = rand(int(cu[-1]), 4, E, gen=gen, dtype=dtype, requires_grad=True)
    k, v = (rand(int(cu[-1]), 2, E, gen=gen, dtype=dtype, requires_grad=True) for _ in range(2))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_varlen("cpu", q, k, v, cu, cu, is_causal=True)
    finally:
        torch.set_num_threads(saved)
