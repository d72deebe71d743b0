"""The ``cpu`` backend's decode forward past 16 query rows (decode_serves in csrc/cpu/attention_kernels.h):
up to 64 rows against at least 1024 visible keys, where a kv head's group has few rows or the blocked
forward's packed K and V would reach 64 MiB; and a decode task that runs its keys in several score
blocks, its rows' softmax state carried across. Which path served a call is read from the
extension's counters; every case that computes is checked against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from conftest import check_attention, check_varlen, rand
from test_cpu_decode import assert_bit_identical_across_calls_and_thread_counts

import fused_attention
from fused_attention.backends import BACKENDS

pytestmark = pytest.mark.skipif(
    BACKENDS["cpu"].unavailable_reason() is not None, reason=str(BACKENDS["cpu"].unavailable_reason())
)


def _path(fn) -> str:
    """Which forward (decode or blocked) served the one cpu forward call fn makes."""
    from fused_attention import _C

    before = _C.cpu_forward_path_counts()
    fn()
    after = _C.cpu_forward_path_counts()
    taken = [name for name, a, b in zip(("decode", "blocked"), after, before) if a != b]
    assert len(taken) == 1 and sum(after) - sum(before) == 1, (before, after)
    return taken[0]


def _qkv(b, hq, hkv, lq, s, d, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return rand(b, hq, lq, d, gen=gen, dtype=dtype), *(rand(b, hkv, s, d, gen=gen, dtype=dtype) for _ in range(2))


@pytest.mark.parametrize(
    "shape,want",
    [
        ((1, 4, 4, 16, 1100, 32), "decode"),  # up to 16 rows: always
        ((1, 4, 4, 17, 1100, 32), "decode"),  # 17 rows per kv head, head dim < 128: up to 32
        ((1, 4, 2, 17, 1100, 32), "blocked"),  # 34
        ((1, 4, 2, 32, 1100, 128), "decode"),  # 64 at head dim 128
        ((1, 4, 1, 24, 1100, 128), "blocked"),  # 96
        ((1, 4, 4, 17, 1023, 32), "blocked"),  # fewer than 1024 keys
        ((1, 4, 4, 64, 1024, 32), "blocked"),  # 64 rows per group at head dim 32
        ((1, 1, 1, 65, 8192, 32), "blocked"),  # past 64 rows
        ((1, 32, 8, 24, 8192, 128), "decode"),  # 96 rows per group, but K and V packed would be 64 MiB
        ((1, 32, 8, 24, 8160, 128), "blocked"),  # just under
        ((1, 32, 4, 40, 16384, 128), "blocked"),  # 64 MiB, but 320 rows per group
        ((16, 32, 8, 24, 1024, 64), "blocked"),  # 64 MiB, but each pair packed by its own task (256 KiB)
    ],
    ids=str,
)
def test_which_forward_serves(shape, want):
    b, hq, hkv, lq, s, d = shape
    q, k, v = torch.zeros(b, hq, lq, d), torch.zeros(b, hkv, s, d), torch.zeros(b, hkv, s, d)  # (values unused)
    # A window of 1100 keys: the rule counts all keys for the packed bytes and the visible ones (>= 1024)
    # for the rows, and the blocked forward computes only those.
    got = _path(lambda: fused_attention.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="cpu",
                                                                     window_size=(1100 - lq, 0)))
    assert got == want


@pytest.mark.parametrize("kwargs", [{"key_lengths": torch.tensor([1000])}, {"is_causal": True},
                                    {"window_size": (900, 0)}], ids=["key_lengths", "top_left_causal", "window"])
def test_the_rule_counts_the_keys_rows_can_see(kwargs):
    """1100 keys, but fewer than 1024 visible to the 20 rows: the blocked forward."""
    q, k, v = _qkv(1, 4, 4, 20, 1100, 32)
    assert _path(lambda: fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu", **kwargs)) == "blocked"
    assert _path(lambda: fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu")) == "decode"


HQ = 8
FEATURES = {
    "plain": {},
    "bottom_right_causal": {"window_size": (-1, 0)},
    "window": {"window_size": (1050, 0)},
    "alibi": {"alibi_slopes": torch.tensor([0.5, 0.1, 0.02, -0.01, 0.3, 0.05, 0.004, 1.0])},
    "softcap": {"softcap": 4.0},
    "key_lengths": {"key_lengths": torch.tensor([1100, 0])},
    "bool_mask": {"attn_mask": torch.rand(2, 1, 20, 1100, generator=torch.Generator().manual_seed(1)) > 0.3},
    "float_mask": {"attn_mask": torch.randn(1, HQ, 1, 1100, generator=torch.Generator().manual_seed(2))},
    "sinks": {"sinks": torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -3.0, 0.25, 4.0])},
}


@pytest.mark.parametrize("feature", FEATURES)
def test_wide_decode_with_each_feature(feature):
    """20 rows of each of 8 heads (no GQA: 20 rows per kv head) against 1100 keys: the decode path, in
    chunks, with every feature (top-left causal rows see too few keys for it: blocked, above). The
    second sequence's key length 0 leaves it no keys: it does not count."""
    q, k, v = _qkv(2, HQ, HQ, 20, 1100, 64, seed=3)
    kwargs = FEATURES[feature]
    assert _path(lambda: fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu", **kwargs)) == "decode"
    check_attention("cpu", q, k, v, grad=False, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_wide_decode_gqa_head_dim_128(dtype):
    """32 rows of each of 2 query heads per kv head at head dim 128: 64 rows (one score block a task)."""
    q, k, v = _qkv(1, 4, 2, 32, 1500, 128, seed=4, dtype=dtype)
    kwargs = {"enable_gqa": True, "window_size": (-1, 0), "alibi_slopes": torch.tensor([0.3, 0.05, 0.2, 0.01])}
    assert _path(lambda: fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu", **kwargs)) == "decode"
    check_attention("cpu", q, k, v, grad=False, **kwargs)


SEVERAL_BLOCKS = {
    "causal": {"window_size": (-1, 0)},
    "window": {"window_size": (700, 0), "softcap": 3.0},
    "lengths": {"key_lengths": torch.tensor([8192, 5000])},
    "alibi": {"window_size": (-1, 0), "alibi_slopes": torch.tensor([0.5, 0.1, 0.02, -0.01, 0.3, 0.05, 0.004, 1.0])},
    "float_mask": {"attn_mask": torch.randn(1, 8, 1, 8192, generator=torch.Generator().manual_seed(3))},
    "sinks": {"sinks": torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -3.0, 0.25, 4.0])},
    "bfloat16": {"window_size": (-1, 0), "dtype": torch.bfloat16},
}


@pytest.mark.parametrize("case", SEVERAL_BLOCKS)
def test_decode_task_over_several_score_blocks(case):
    """16 rows of 4 query heads per kv head (64 rows: score blocks of 256 keys) over 4 x 8192 keys: tasks
    of 512 keys (64 of them), each in two score blocks whose softmax state carries across (the window's
    716 visible keys a head make tasks of one block: the contrast)."""
    kwargs = dict(SEVERAL_BLOCKS[case])
    q, k, v = _qkv(2, 8, 2, 16, 8192, 16, seed=5, dtype=kwargs.pop("dtype", torch.float32))
    call = lambda: fused_attention.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="cpu", **kwargs)
    assert _path(call) == "decode"
    check_attention("cpu", q, k, v, grad=False, enable_gqa=True, **kwargs)


def test_wide_decode_varlen_and_gradients():
    """Packed sequences of 20 and 3 query rows against 1300 and 1500 keys; and gradients (the blocked
    backward) consistent with the decode forward's output and lse."""
    gen = torch.Generator().manual_seed(6)
    cu_q, cu_k = torch.tensor([0, 20, 23], dtype=torch.int32), torch.tensor([0, 1300, 2800], dtype=torch.int32)
    q = rand(23, 2, 48, gen=gen)
    k, v = (rand(2800, 2, 48, gen=gen) for _ in range(2))
    assert _path(lambda: fused_attention.varlen_attention(q, k, v, cu_q, cu_k, 20, 1500, window_size=(-1, 0),
                                                          backend="cpu")) == "decode"
    check_varlen("cpu", q, k, v, cu_q, cu_k, grad=False, window_size=(-1, 0))
    q, k, v = _qkv(1, 2, 2, 18, 1030, 32, seed=7)
    check_attention("cpu", q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), window_size=(-1, 0))


def test_wide_decode_is_bit_identical_across_calls_and_thread_counts():
    q, k, v = _qkv(1, 8, 2, 16, 8192, 16, seed=8)
    assert_bit_identical_across_calls_and_thread_counts(q, k, v, enable_gqa=True, window_size=(-1, 0))
