"""The ``cpu`` backend's threads steal work (csrc/cpu/attention_tasks.h, TaskClaims): a thread that has run
its own tasks takes the rest of another thread's run from its back end. With more threads than cores some
threads start late or are preempted, so tasks change hands often; each must still run exactly once, and
what it computes must not depend on the thread that runs it: repeated calls give the same bits, and the
results meet the float64 reference. One case per parallel loop that steals: decode chunks, forward blocks
(long sequences), forward pairs (many short sequences), the backward's whole and split tasks."""

from __future__ import annotations

import pytest
import torch
from conftest import check_attention, rand

import fused_attention
from fused_attention.backends import BACKENDS

pytestmark = pytest.mark.skipif(
    BACKENDS["cpu"].unavailable_reason() is not None, reason=str(BACKENDS["cpu"].unavailable_reason())
)

# More threads than the machine's cores (CI's have two), and not a divisor of any case's task count.
THREADS = 7

# (q shape, kv shape, kwargs, with gradients)
CASES = {
    # one query row per head against 3000 keys: 4 kv heads x 6 chunks of keys, merged in chunk order
    "decode": ((1, 16, 1, 64), (1, 4, 3000, 64), {"enable_gqa": True}, False),
    # 4 (sequence, kv head) pairs, fewer than 4 per thread: 240-row blocks x query heads
    "forward_blocks": ((1, 8, 1000, 32), (1, 4, 1000, 32), {"enable_gqa": True, "is_causal": True}, False),
    # 64 short pairs: each task packs and runs one pair
    "forward_pairs": ((16, 4, 64, 32), (16, 4, 64, 32), {}, False),
    # 32 (batch, kv head) tasks, at least 4 per thread: whole tasks
    "backward_whole": ((8, 4, 100, 32), (8, 4, 100, 32), {"is_causal": True}, True),
    # 4 tasks on 7 threads: each cut into 7 parts, summed in part order
    "backward_split": ((1, 8, 300, 32), (1, 4, 300, 32), {"enable_gqa": True, "is_causal": True}, True),
}


@pytest.fixture
def many_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("case", CASES)
def test_stolen_tasks_run_once_with_the_same_bits(case, many_threads):
    q_shape, kv_shape, kwargs, grad = CASES[case]
    gen = torch.Generator().manual_seed(5)
    q = rand(*q_shape, gen=gen, requires_grad=grad)
    k, v = (rand(*kv_shape, gen=gen, requires_grad=grad) for _ in range(2))
    upstream = rand(*q_shape, gen=gen)
    results = []
    for _ in range(6):
        out = fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu", **kwargs)
        results.append((out, *(torch.autograd.grad(out, (q, k, v), upstream) if grad else ())))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    check_attention("cpu", q, k, v, grad=grad, **kwargs)
