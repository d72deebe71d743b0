"""The ``cpu`` backend's decode forward (csrc/cpu/attention_decode.h): calls with at most 16 query rows per
sequence read each KV head's K and V once for its whole query group and split the keys into chunks (512
keys, more for long caches; merged by log-sum-exp in chunk order). These cases force the split (S past
several chunks, several KV heads, one KV head) and every feature through it, against the float64
reference."""

from __future__ import annotations

import pytest
import torch
from conftest import check_attention, check_varlen, rand

import fused_attention
from fused_attention.backends import BACKENDS

pytestmark = pytest.mark.skipif(
    BACKENDS["cpu"].unavailable_reason() is not None, reason=str(BACKENDS["cpu"].unavailable_reason())
)

FEATURES = {
    "plain": {},
    "bottom_right_causal": {"window_size": (-1, 0)},
    "window": {"window_size": (300, 0)},
    "top_left_causal": {"is_causal": True},
    "alibi": {"alibi_slopes": torch.tensor([0.5, 0.1, 0.02, -0.01, 0.3, 0.05, 0.004, 1.0])},
    "softcap": {"softcap": 4.0},
    "key_lengths": {"key_lengths": torch.tensor([1100, 0])},
    "bool_mask": {"attn_mask": torch.rand(2, 1, 8, 1100, generator=torch.Generator().manual_seed(1)) > 0.3},
    "float_mask": {"attn_mask": torch.randn(1, 8, 1, 1100, generator=torch.Generator().manual_seed(2))},
    "sinks": {"sinks": torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -3.0, 0.25, 4.0])},
}


def _inputs(lq, s=1100, hq=8, hkv=2, d=64, dtype=torch.float32, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return rand(batch, hq, lq, d, gen=gen, dtype=dtype), *(rand(batch, hkv, s, d, gen=gen, dtype=dtype) for _ in range(2))


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("lq", [1, 8])
def test_decode_split_with_each_feature(feature, lq):
    kwargs = dict(FEATURES[feature])
    if "attn_mask" in kwargs and kwargs["attn_mask"].size(2) != 1:
        kwargs["attn_mask"] = kwargs["attn_mask"][:, :, :lq]
    q, k, v = _inputs(lq)
    check_attention("cpu", q, k, v, grad=False, enable_gqa=True, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_decode_split_in_every_dtype(dtype):
    q, k, v = _inputs(4, dtype=dtype)
    check_attention("cpu", q, k, v, grad=False, enable_gqa=True, window_size=(-1, 0),
                    alibi_slopes=FEATURES["alibi"]["alibi_slopes"])


@pytest.mark.parametrize("head_dim", [40, 128])
def test_decode_odd_head_dims_and_a_kv_cache_layout(head_dim):
    """Head dim 40 converts K and V rows (not whole vectors); (B, S, H, D) caches read rows H * D apart."""
    gen = torch.Generator().manual_seed(4)
    q = rand(1, 6, 3, head_dim, gen=gen)
    k, v = (rand(1, 777, 3, head_dim, gen=gen).transpose(1, 2) for _ in range(2))
    check_attention("cpu", q, k, v, grad=False, enable_gqa=True, key_lengths=torch.tensor([700]))


@pytest.mark.parametrize("group,lq", [(1, 1), (3, 1), (4, 1), (1, 7), (5, 2)])
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 128), (torch.float64, 64), (torch.bfloat16, 128),
                                            (torch.bfloat16, 160), (torch.bfloat16, 96), (torch.float32, 256),
                                            (torch.float32, 64)])
def test_decode_every_row_remainder(group, lq, dtype, head_dim):
    """Query rows per KV head (group x Lq) of every remainder: q.k takes them 4, 2 and 1 at a time, and P.V
    2 and 1 at a time where value rows are whole multiples of 8 vectors (head dim 128 in float, 64 in
    double); in bfloat16 q.k on AMX tiles from 4 rows (Llama's GQA group of 4, one token) where the machine
    has them, P.V up to 4 rows x 64 features and 1 x 128 (head dims 128, 160, 96), on tiles from 8 rows.
    700 keys: a ragged last block of 16 keys and of a P.V key block."""
    gen = torch.Generator().manual_seed(8)
    q = rand(1, 2 * group, lq, head_dim, gen=gen, dtype=dtype)
    k, v = (rand(1, 2, 700, head_dim, gen=gen, dtype=dtype) for _ in range(2))
    check_attention("cpu", q, k, v, grad=False, enable_gqa=True, window_size=(-1, 0))


@pytest.mark.parametrize("feature", FEATURES)
def test_decode_bfloat16_with_each_feature(feature):
    """bfloat16, 4 query heads per kv head and 8 rows each (speculative decoding's 32 rows per kv head):
    on a CPU with AMX the products run on tiles (attention_decode_amx.h), elsewhere on vdpbf16ps."""
    kwargs = dict(FEATURES[feature])
    if "attn_mask" in kwargs and kwargs["attn_mask"].size(2) != 1:
        kwargs["attn_mask"] = kwargs["attn_mask"][:, :, :8]
    q, k, v = _inputs(8, dtype=torch.bfloat16)
    check_attention("cpu", q, k, v, grad=False, enable_gqa=True, **kwargs)


@pytest.mark.parametrize("group,lq", [(4, 2), (3, 4), (5, 4), (11, 3)])
@pytest.mark.parametrize("head_dim", [64, 96, 160])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_decode_bfloat16_row_tiles(group, lq, head_dim, layout):
    """Rows per kv head from 8 (the least the AMX tiles take) to 33 (16-row tiles with 1, 4, 12 and 15 rows
    of padding), head dims of 2, 3 and 5 tiles of 32 features, 700 keys (a ragged last block of 32 and of
    a value block of 128), and a (B, S, H, D) cache whose key rows are not adjacent."""
    gen = torch.Generator().manual_seed(8)
    q = rand(1, 2 * group, lq, head_dim, gen=gen, dtype=torch.bfloat16)
    k, v = (rand(1, 2, 700, head_dim, gen=gen, dtype=torch.bfloat16) for _ in range(2))
    if layout == "bshd":
        k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
    check_attention("cpu", q, k, v, grad=False, enable_gqa=True, window_size=(-1, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq", [1, 3])
def test_decode_long_cache_in_chunks_past_512(dtype, lq):
    """A long contiguous (B, H, S, D) cache: 2 kv heads x 24000 keys go in chunks of 704-736
    (decode_chunk_keys keeps 64 tasks, not chunks of 512), with 4 and 12 query rows per kv head
    (bfloat16: q.k on AMX tiles, and P V too from 8 rows, where the machine has them)."""
    gen = torch.Generator().manual_seed(9)
    q = rand(1, 8, lq, 128, gen=gen, dtype=dtype)
    k, v = (rand(1, 2, 24000, 128, gen=gen, dtype=dtype) for _ in range(2))
    check_attention("cpu", q, k, v, grad=False, enable_gqa=True, window_size=(-1, 0),
                    alibi_slopes=FEATURES["alibi"]["alibi_slopes"])


def test_decode_mqa_one_kv_head_many_threads_with_gradients():
    """One KV head, small L, more threads than cores: the keys are the only parallelism. The gradients
    (the blocked backward) check that the forward's output and lse agree with it."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        q, k, v = _inputs(5, s=1500, hq=4, hkv=1, d=32, batch=1)
        check_attention("cpu", q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), enable_gqa=True,
                        window_size=(-1, 0))
    finally:
        torch.set_num_threads(threads)


def test_decode_varlen_short_queries_long_keys():
    gen = torch.Generator().manual_seed(6)
    cu_q, cu_k = torch.tensor([0, 1, 9, 12], dtype=torch.int32), torch.tensor([0, 1300, 1301, 2000], dtype=torch.int32)
    q = rand(12, 4, 64, gen=gen)
    k, v = (rand(2000, 2, 64, gen=gen) for _ in range(2))
    check_varlen("cpu", q, k, v, cu_q, cu_k, grad=False, is_causal=True)


def assert_bit_identical_across_calls_and_thread_counts(q, k, v, **kwargs):
    """Two calls at the session's thread count, then 1 and 3 threads: the same output and lse bits."""
    kwargs = {**kwargs, "return_lse": True, "backend": "cpu"}
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            results.append(fused_attention.scaled_dot_product_attention(q, k, v, **kwargs))
    finally:
        torch.set_num_threads(threads)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


def test_decode_split_is_bit_identical_across_calls_and_thread_counts():
    q, k, v = _inputs(8, s=2000, hq=8, hkv=1, batch=1, seed=7)
    assert_bit_identical_across_calls_and_thread_counts(q, k, v, enable_gqa=True, window_size=(-1, 0),
                                                        alibi_slopes=FEATURES["alibi"]["alibi_slopes"])


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_decode_ragged_batch_on_several_threads(threads):
    """Sequences of very unequal length (one long, several of a few keys) in one call: the threads take
    runs of tasks of equal cost, not of equal count, so a run can hold one task or many; every task
    must run once whatever the thread count (several threads here: the suite's workers run one)."""
    gen = torch.Generator().manual_seed(8)
    cu_q = torch.tensor([0, 1, 2, 4, 5, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 2100, 2101, 2103, 2900, 2901], dtype=torch.int32)
    q = rand(6, 8, 64, gen=gen)
    k, v = (rand(2901, 2, 64, gen=gen) for _ in range(2))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        check_varlen("cpu", q, k, v, cu_q, cu_k, grad=False, is_causal=True)
    finally:
        torch.set_num_threads(saved)


def test_bfloat16_step_keeps_float32_probabilities():
    """A bfloat16 step (found by a random sweep): the AVX512-BF16 P V had rounded P to bfloat16, and the
    output came out 1.17x the bound of the float32 arithmetic the cpu backend promises for 16-bit inputs.
    P now goes in as two bfloat16 parts (16 significant bits). Machines without AVX512-BF16 take the float
    path here, which always passed."""
    gen = torch.Generator().manual_seed(162)
    q = rand(1, 8, 1, 32, dtype=torch.bfloat16, gen=gen)
    k, v = (rand(1, 4, 320, 32, dtype=torch.bfloat16, gen=gen) for _ in range(2))
    mask = rand(1, 320, dtype=torch.bfloat16, gen=gen)
    slopes = torch.rand(8, generator=gen)
    lengths = torch.randint(0, 321, (1,), generator=gen)
    sinks = torch.randn(8, generator=gen)
    check_attention("cpu", q, k, v, enable_gqa=True, scale=0.05, attn_mask=mask, alibi_slopes=slopes,
                    key_lengths=lengths, sinks=sinks)
