"""The Triton split-KV kernel behind ``attention_with_kvcache`` (backend ``"triton"``), under the Triton
interpreter: against the per-sequence reference of test_kvcache.py, reading pages in place, deterministic
for a given ``num_splits``."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_backends
from test_kvcache import _matrix, check_case, make_case, run_case

import fused_attention.kvcache.attention as kvcache_attention
from fused_attention.kernels.layout import empty_in_layout_of

interpreted = pytest.mark.skipif("triton" not in shared_backends(), reason="triton cannot run on CPU tensors here")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Every feature set of test_kvcache's matrix once (its first block) in float32, every third in float16
# (the interpreter takes about a second a case).
_CASES = [
    pytest.param(seed, {**config, "dtype": dtype}, id=f"{str(dtype)[6:]}-{p.id}")
    for p in _matrix(12)
    for seed, config in [p.values]
    for dtype in (torch.float32, torch.float16)
    if dtype == torch.float32 or seed % 3 == 0
]


@interpreted
@pytest.mark.parametrize("seed,config", _CASES)
def test_split_kv_kernel_matches_reference(seed, config):
    with torch.no_grad():
        check_case(make_case(seed, **config), "triton")


@interpreted
def test_split_kv_reads_pages_in_place(monkeypatch):
    """The kernel reads through the block table: the plain path's page gather is never called."""

    def no_gather(call):
        raise AssertionError("the triton path gathered the pages")

    monkeypatch.setattr(kvcache_attention, "gather_keys_values", no_gather)
    case = make_case(3, layout="bshd", page_size=3, seq_q=4, append=True, group=4, num_splits=3,
                     dtype=torch.float32, features=("causal", "alibi"))
    with torch.no_grad():
        check_case(case, "triton")


def _long_case(seq_q, page_size, num_splits, features=()):
    """test_kvcache's case layout with a cache long enough (400 keys, 64-key tiles) for every split to
    hold keys, including split boundaries inside a page."""
    gen = torch.Generator().manual_seed(11)
    batch, hkv, group, dim, capacity = 2, 2, 4, 32, 400
    pages = capacity // page_size
    table = torch.randperm(batch * pages + 3, generator=gen)[: batch * pages].view(batch, pages).to(torch.int32)
    randn = lambda *shape: torch.randn(*shape, generator=gen)
    return {
        "q": randn(batch, seq_q, hkv * group, dim),
        "k_cache": randn(batch * pages + 3, page_size, hkv, dim), "v_cache": randn(batch * pages + 3, page_size, hkv, dim),
        "k": None, "v": None, "seqlens": torch.tensor([capacity, 333], dtype=torch.int32), "block_table": table,
        "batch_idx": None, "leftpad": None, "rope": None, "is_causal": "causal" in features, "window_size": None,
        "alibi_slopes": None, "softcap": None, "scale": None, "layout": "bshd", "num_splits": num_splits,
    }


@interpreted
@pytest.mark.parametrize("seq_q,num_splits", [(1, 3), (4, 5)])
def test_split_kv_long_cache_every_split_holds_keys(seq_q, num_splits):
    with torch.no_grad():
        check_case(_long_case(seq_q, 16, num_splits, ("causal",)), "triton")


@interpreted
@pytest.mark.parametrize("page_size", [16, 5])
def test_split_kv_reads_only_the_window_and_past_left_padding(page_size):
    """The splits share the keys from the first row's window edge (and past left padding) on, not the whole
    cache: starts inside pages, entries whose visible keys cover fewer tiles than there are splits."""
    case = _long_case(4, page_size, 5) | {"window_size": (45, 0), "leftpad": torch.tensor([3, 300], dtype=torch.int32)}
    with torch.no_grad():
        check_case(case, "triton")
        check_case(case | {"window_size": (250, 0)}, "triton")


@interpreted
@pytest.mark.parametrize("window", [(2**31 - 1, 0), (-1, 2**31 - 1)], ids=str)
def test_split_kv_window_sizes_past_int32_positions(window):
    """Window sides as wide as int32 allows: unbounded, not wrapped around in the kernel's positions."""
    case = _long_case(4, 16, 2) | {"window_size": window}
    with torch.no_grad():
        check_case(case, "triton")


@interpreted
@pytest.mark.parametrize("num_splits", [2**64, 10**6])
def test_split_kv_more_splits_than_keys(num_splits):
    """num_splits past the key count is as many splits as keys, as on the other backends: 2**64 failed to
    allocate the partial results (a TypeError naming nothing), 10**6 allocated and launched a million."""
    case = make_case(3, layout="bshd", page_size=None, seq_q=1, append=True, group=2, num_splits=num_splits,
                     dtype=torch.float32, length=9)
    with torch.no_grad():
        out, lse = check_case(case, "triton")
        as_many_as_keys = run_case({**case, "num_splits": 9}, "triton")
    assert torch.equal(out, as_many_as_keys[0]) and torch.equal(lse, as_many_as_keys[1])


@interpreted
def test_split_kv_is_deterministic_and_splits_agree():
    case = _long_case(1, 16, 4)
    with torch.no_grad():
        first, again = run_case(case, "triton"), run_case(case, "triton")
        one_split = run_case({**case, "num_splits": 1}, "triton")
    for a, b in zip(first[:2], again[:2]):
        assert torch.equal(a, b)
    for a, b in zip(first[:2], one_split[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# On a GPU: the compiled kernel (Triton has no float64 dot), every case of two blocks of the matrix in
# float32, the first block in float16 and bfloat16 too, checked on the CPU against the float64 reference.
_GPU_CASES = [
    pytest.param(seed, {**config, "dtype": dtype}, id=f"{str(dtype)[6:]}-{p.id}")
    for p in _matrix(24)
    for seed, config in [p.values]
    for dtype in ((torch.float32, torch.float16, torch.bfloat16) if seed < 12 else (torch.float32,))
]


@gpu
@pytest.mark.parametrize("seed,config", _GPU_CASES)
def test_split_kv_kernel_on_the_gpu(seed, config):
    with torch.no_grad():
        check_case(make_case(seed, **config), "triton", device="cuda")


@gpu
@pytest.mark.parametrize("seq_q,num_splits", [(1, 3), (4, 5), (1, 0)])
def test_split_kv_long_cache_on_the_gpu(seq_q, num_splits):
    with torch.no_grad():
        check_case(_long_case(seq_q, 16, num_splits, ("causal",)), "triton", device="cuda")


@interpreted
@pytest.mark.parametrize("splits", [1, 3, 33, 70])
@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
def test_combine_kernel_matches_the_torch_merge(splits, sinks):
    """The split-KV combine kernel against the torch merge of :mod:`fused_attention.merge`: rows some
    splits did not see, a row no split saw, sinks, split counts past one block of splits, a value head
    dim that is not a power of 2; stored in the caller's dtype."""
    from fused_attention.kernels.triton.kvcache_combine import kvcache_combine
    from fused_attention.merge import _merge_aligned, fold_sinks_

    gen = torch.Generator().manual_seed(splits)
    batch, heads, seq_q, dim_v = 2, 3, 2, 24
    parts = torch.randn(splits, batch, heads, seq_q, dim_v, generator=gen)
    lse = torch.randn(splits, batch, heads, seq_q, generator=gen) * 4
    lse[1:, 0, 1, 0] = float("-inf")  # only the first split saw this row
    lse[:, 1, 2, 1] = float("-inf")  # no split saw this one
    parts[:, 1, 2, 1] = 0
    sink = torch.randn(heads, generator=gen) if sinks else None
    expected, expected_lse = _merge_aligned(list(parts), list(lse))
    if sinks:
        fold_sinks_(expected, expected_lse, sink)
    for dtype in (torch.float32, torch.float16):
        # the output takes the query's dtype and layout: contiguous, or (B, L, H, Dv) memory
        for query in (torch.empty(batch, heads, seq_q, 8, dtype=dtype),
                      torch.empty(batch, seq_q, heads, 8, dtype=dtype).transpose(1, 2)):
            out, out_lse = kvcache_combine(parts, lse, sink, query)
            assert out.dtype == dtype and out_lse.dtype == torch.float32
            assert out.stride() == empty_in_layout_of(query, dim_v).stride()
            torch.testing.assert_close(out, expected.to(dtype), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out_lse, expected_lse, rtol=1e-5, atol=1e-6)
    assert torch.isneginf(out_lse[1, 2, 1]) == (not sinks) and out[1, 2, 1].eq(0).all()
