"""The ``cpu`` backend's KV-cache op (``fused_attention::kvcache_attention``): caches read where they lie.

Long caches, so that the decode kernel splits keys into several chunks and reads whole pages in place
(float32 rows of whole vectors), next to page sizes whose runs cross its 16-key steps; more than 16
query rows take the blocked forward through the same page table. Checked against the per-sequence
reference of test_kvcache.py; and the call allocates nothing the size of the cache (nothing gathered).
"""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends
from test_kvcache import check_case, make_case

import fused_attention as fa

pytestmark = pytest.mark.skipif("cpu" not in cpu_backends(), reason="the cpu backend is not built")

FEATURES = [(), ("causal",), ("window", "alibi"), ("leftpad", "causal", "softcap"), ("batch_idx",)]


CASES = [
    pytest.param(features, page, seq_q, id=f"{'-'.join(features) or 'plain'}-p{page}-q{seq_q}")
    for features in FEATURES
    for page in ([None] if "batch_idx" in features else [None, 1, 3, 16, 256])  # batch_idx: contiguous only
    for seq_q in (1, 8, 17)
]


@pytest.mark.parametrize("features,page_size,seq_q", CASES)
def test_long_caches_against_reference(features, page_size, seq_q):
    c = make_case(11 * seq_q + (page_size or 0), layout="bshd", page_size=page_size, seq_q=seq_q, append=True,
                  group=4, num_splits=0, dtype=torch.float32, features=features, length=1300, dims=(64, 32))
    with torch.no_grad():
        check_case(c, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("page_size", [None, 16])
def test_long_caches_other_dtypes(dtype, page_size):
    c = make_case(5, layout="bhsd", page_size=page_size, seq_q=4, append=False, group=3, num_splits=0,
                  dtype=dtype, features=("causal", "alibi"), length=1100, dims=(64, 64))
    with torch.no_grad():
        check_case(c, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [None, 4096])
def test_long_bhsd_caches_in_chunks_past_512(dtype, page_size):
    """(B, H, S, D) caches of 12288 keys, contiguous (one page of S_max) or in pages of 4096: each head's
    rows lie in runs of a long chunk, and the decode reads them in chunks of more than 512 keys."""
    c = make_case(3, layout="bhsd", page_size=page_size, seq_q=2, append=True, group=4, num_splits=0,
                  dtype=dtype, features=("causal", "softcap"), length=12288, dims=(64, 64))
    with torch.no_grad():
        check_case(c, "cpu")


def _decode_step(page_size: int | None):
    """A decode step over caches of 8 MiB each: (B=2, S=4096, Hkv=4, D=64) float32."""
    gen = torch.Generator().manual_seed(0)
    batch, length, heads_kv, dim = 2, 4096, 4, 64
    q = torch.randn(batch, 1, 4 * heads_kv, dim, generator=gen)
    if page_size is None:
        shape, table = (batch, length, heads_kv, dim), None
    else:
        pages = batch * length // page_size
        shape, table = (pages, page_size, heads_kv, dim), torch.randperm(pages, generator=gen).view(batch, -1).int()
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return q, k, v, table, torch.tensor([length - 100, length], dtype=torch.int32)


@pytest.mark.parametrize("page_size", [None, 16])
def test_nothing_is_gathered(page_size):
    q, k, v, table, seqlens = _decode_step(page_size)
    call = {"cache_seqlens": seqlens, "block_table": table, "is_causal": True, "return_lse": True, "backend": "cpu"}
    with torch.no_grad():
        fa.attention_with_kvcache(q, k, v, **call)  # warm-up: first-call allocations are not the call's
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            out, _ = fa.attention_with_kvcache(q, k, v, **call)
        expected, _ = fa.attention_with_kvcache(q, k, v, **{**call, "backend": "torch"})
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    allocated = max(e.cpu_memory_usage for e in prof.key_averages())
    assert allocated < k.numel() * k.element_size() // 16, f"an op allocated {allocated} bytes for a {k.nbytes}-byte cache"


def test_op_refuses_pages_outside_the_pool():
    q = torch.randn(1, 2, 1, 16)
    k = v = torch.randn(4, 2, 8, 16)  # (pages, Hkv, page_size, D)
    seqlens = torch.tensor([12])
    table = torch.tensor([[1, 4]])  # page 4 does not exist
    common = (None, None, -1, -1, 0.0, 0.25)
    with pytest.raises(RuntimeError, match=r"page 1 of entry 0 is 4, outside the page pool"):
        torch.ops.fused_attention.kvcache_attention(q, k, v, table, None, seqlens, 0, None, 0, 12, *common)
    with pytest.raises(RuntimeError, match="entry 0 needs tokens up to 19 but its pages hold 16"):
        torch.ops.fused_attention.kvcache_attention(q, k, v, torch.tensor([[1, 2]]), None, torch.tensor([20]), 0,
                                                    None, 0, 20, *common)
    with pytest.raises(RuntimeError, match="cache rows"):  # a contiguous cache's row that does not exist
        torch.ops.fused_attention.kvcache_attention(q, k, v, None, torch.tensor([4]), torch.tensor([5]), 0, None, 0, 8,
                                                    *common)


@pytest.mark.parametrize("paged", [False, True])
def test_append_op_checks_everything_before_it_writes(paged):
    """``kvcache_append_attention_`` writes the caches only once every check has passed: appends past the
    capacity, into pages outside the pool or with a negative length raise and leave them as they were."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 1, 16, generator=gen)
    k_cache, v_cache = torch.randn(4, 2, 8, 16, generator=gen), torch.randn(4, 2, 8, 16, generator=gen)
    k_new, v_new = torch.randn(1, 2, 2, 16, generator=gen), torch.randn(1, 2, 2, 16, generator=gen)
    table = torch.tensor([[1, 4]]) if paged else None  # page 4 does not exist
    rows = None if paged else torch.tensor([3])
    bad = [(torch.tensor([7]), "page 1 of entry 0 is 4" if paged else "needs tokens up to 8"),
           (torch.tensor([-1]), "seqlens must be >= 0"),
           (torch.tensor([2**63 - 1]), "out of range")]  # seqlens + Lnew would overflow past every check
    if not paged:
        bad.append((torch.tensor([2]), None))  # fine: the check below writes
    for seqlens, message in bad:
        kc, vc = k_cache.clone(), v_cache.clone()
        args = (kc, vc, k_new, v_new, q, table, rows, seqlens, None, None, None, -1, -1, 0.0, 0.25)
        if message is None:
            torch.ops.fused_attention.kvcache_append_attention_(*args)
            assert torch.equal(kc[3, :, 2:4], k_new[0]) and torch.equal(vc[3, :, 2:4], v_new[0])
            kc[3, :, 2:4], vc[3, :, 2:4] = k_cache[3, :, 2:4], v_cache[3, :, 2:4]
        else:
            with pytest.raises(RuntimeError, match=message):
                torch.ops.fused_attention.kvcache_append_attention_(*args)
        assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache), "only the new tokens may be written"


@pytest.mark.parametrize("wants_grad", ["q", "k_cache", "v_cache", "k", "v", "alibi"])
def test_ops_called_directly_refuse_gradients(wants_grad):
    """The ops have no backward: a direct ``torch.ops`` call with an input that requires grad raises before
    it runs, naming the input (it returned outputs whose gradients came out None without a word, the append
    op after writing its caches); under no_grad, or with nothing requiring grad, they run."""
    gen = torch.Generator().manual_seed(9)
    inputs = {"q": torch.randn(1, 2, 1, 16, generator=gen), "k_cache": torch.randn(4, 2, 8, 16, generator=gen),
              "v_cache": torch.randn(4, 2, 8, 16, generator=gen), "k": torch.randn(1, 2, 1, 16, generator=gen),
              "v": torch.randn(1, 2, 1, 16, generator=gen), "alibi": torch.rand(1, 2, generator=gen)}
    seqlens, rows, tail = torch.tensor([5]), torch.tensor([2]), (None, -1, -1, 0.0, 0.25)

    def calls(x):
        kc, vc = x["k_cache"].clone(), x["v_cache"].clone()
        if x["k_cache"].requires_grad or x["v_cache"].requires_grad:  # (a leaf that requires grad: in place refused)
            kc, vc = x["k_cache"], x["v_cache"]
        return [
            (lambda: torch.ops.fused_attention.kvcache_attention(x["q"], x["k_cache"], x["v_cache"], None, rows,
                                                                 seqlens, 0, None, 0, 5, x["alibi"], *tail), None),
            (lambda: torch.ops.fused_attention.kvcache_append_attention_(kc, vc, x["k"], x["v"], x["q"], None, rows,
                                                                         seqlens, None, x["alibi"], *tail), (kc, vc)),
        ]

    wanting = {n: t.clone().requires_grad_(n == wants_grad) for n, t in inputs.items()}
    for call, caches in calls(wanting):
        if caches is None and wants_grad in ("k", "v"):
            continue  # kvcache_attention takes no new keys
        before = [c.detach().clone() for c in caches] if caches else []
        with pytest.raises(ValueError, match=f"forward only .*but {wants_grad} requires grad"):
            call()
        assert all(torch.equal(c.detach(), b) for c, b in zip(caches or [], before)), "the caches were written"
        with torch.no_grad():
            assert not call()[0].requires_grad
    for call, _ in calls(inputs):
        assert not call()[0].requires_grad


def test_append_op_bumps_the_caches_versions():
    """The caches' version counters move when the op writes them, as with torch's in-place ops, under no_grad
    and under inference_mode: a backward that saved a tensor sharing a cache's storage before the append is
    refused (it read the written values silently). Caches made in inference mode have no counter and still
    take appends under no_grad."""
    a = torch.randn(4, 2, 8, 16, requires_grad=True)
    saved = a.exp()  # exp saves its output for the backward
    k_cache, v_cache = saved.detach(), torch.randn(4, 2, 8, 16)  # (detach shares the storage and the counter)
    new = [torch.randn(1, 2, 1, 16) for _ in range(3)]
    tail = (None, torch.tensor([3]), torch.tensor([2]), None, None, None, -1, -1, 0.0, 0.25)
    versions = (k_cache._version, v_cache._version)
    with torch.no_grad():
        torch.ops.fused_attention.kvcache_append_attention_(k_cache, v_cache, *new, *tail)
    assert (k_cache._version, v_cache._version) == (versions[0] + 1, versions[1] + 1)
    with torch.inference_mode():  # (caches made outside it keep their counters)
        torch.ops.fused_attention.kvcache_append_attention_(k_cache, v_cache, *new, *tail)
    assert (k_cache._version, v_cache._version) == (versions[0] + 2, versions[1] + 2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()
    with torch.inference_mode():
        k_cache, v_cache = torch.randn(4, 2, 8, 16), torch.randn(4, 2, 8, 16)
    with torch.no_grad():
        torch.ops.fused_attention.kvcache_append_attention_(k_cache, v_cache, *new, *tail)


@pytest.mark.parametrize("paged", [False, True])
def test_append_attention_op_declares_its_mutations(paged):
    """``opcheck`` of the fused append + attention op: the schema's ``Tensor(a!)``, ``Tensor(b!)`` caches
    are all it writes, its fake agrees with it, and it traces."""
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 3, 16, generator=gen)
    slots = 5 if paged else 9  # page size, or S_max
    k_cache, v_cache = torch.randn(6, 2, slots, 16, generator=gen), torch.randn(6, 2, slots, 8, generator=gen)
    k_new, v_new = torch.randn(2, 2, 3, 16, generator=gen), torch.randn(2, 2, 3, 8, generator=gen)
    table = torch.tensor([[4, 0, 2], [1, 5, 3]]) if paged else None
    rows = None if paged else torch.tensor([5, 2])
    args = (k_cache, v_cache, k_new, v_new, q, table, rows, torch.tensor([4, 0]), None, None, None, -1, 0, 0.0, 0.25)
    torch.library.opcheck(torch.ops.fused_attention.kvcache_append_attention_.default, args)


@pytest.mark.parametrize("dims", [(32, 96), (64, 32), (128, 64), (40, 64)], ids=str)
@pytest.mark.parametrize("seq_q", [1, 3, 5])
@pytest.mark.parametrize("page_size", [None, 3])
def test_bfloat16_decode_shapes(dims, seq_q, page_size):
    """bfloat16 decode (on AVX512-BF16 CPUs the products run on vdpbf16ps): feature counts of 1 to 4
    blocks of 32 and one that is not (40), 3 to 15 rows per group (register tiles of 1 to 4 rows), odd
    key counts and pages of 3 (pairs of keys across pages)."""
    c = make_case(seq_q, layout="bshd", page_size=page_size, seq_q=seq_q, append=True, group=3, num_splits=0,
                  dtype=torch.bfloat16, features=("causal", "softcap"), length=1001, dims=dims)
    with torch.no_grad():
        check_case(c, "cpu")


def test_strided_cache_batch_idx():
    """A strided int64 index (a view) picks the same rows as its contiguous copy: the same bits."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 1, 4, 16, generator=gen)
    k, v = torch.randn(10, 40, 2, 16, generator=gen), torch.randn(10, 40, 2, 16, generator=gen)
    index = torch.tensor([4, 9, 0, 9, 2, 9])[::2]
    lengths = torch.tensor([5, 40, 17], dtype=torch.int32)
    with torch.no_grad():
        got = fa.attention_with_kvcache(q, k, v, cache_seqlens=lengths, cache_batch_idx=index, backend="cpu")
        want = fa.attention_with_kvcache(q, k, v, cache_seqlens=lengths, cache_batch_idx=index.contiguous(),
                                         backend="cpu")
    assert torch.equal(got, want)


@pytest.mark.parametrize("dominant", [False, True], ids=["spread", "dominant"])
@pytest.mark.parametrize("keys", [33, 34])
def test_bfloat16_decode_infinite_value_stays_infinite(keys, dominant):
    """An infinite value in the last key gives an infinite output, not NaN, with odd and even key counts
    (the AVX512-BF16 product pairs an odd last key with zeros). Dominant: that key holds the rows' weight,
    its probability is 1 and bfloat16 holds it exactly, so P's remainder part is 0 and 0 times inf NaN in
    the pairs' product: the tile is summed again in float."""
    gen = torch.Generator().manual_seed(keys)
    q = torch.randn(1, 4, 1, 64, generator=gen).bfloat16()
    k = torch.randn(1, 1, keys, 64, generator=gen).bfloat16()
    v = torch.randn(1, 1, keys, 64, generator=gen).bfloat16()
    if dominant:
        q[:] = q[:, :1]  # one direction for the four query heads, and the last key far along it
        k[0, 0, keys - 1] = 10 * q[0, 0, 0]
    v[0, 0, keys - 1, 0] = float("inf")
    with torch.no_grad():
        out = fa.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="cpu")
    assert torch.isinf(out[..., 0]).all() and torch.isfinite(out[..., 1:]).all()


def test_ops_check_the_alibi_slopes_shape():
    """The kernels index the slopes by (batch entry, head) unchecked: a slope table too small is refused."""
    q = torch.randn(2, 4, 1, 16)
    k = v = torch.randn(2, 2, 8, 16)
    seqlens = torch.tensor([5, 6])
    for slopes in (torch.ones(1, 1), torch.ones(3, 4), torch.ones(2, 2)):
        with pytest.raises(RuntimeError, match="alibi slopes must be canonical"):
            torch.ops.fused_attention.kvcache_attention(q, k, v, None, None, seqlens, 0, None, 0, 8, slopes, None,
                                                        -1, -1, 0.0, 0.25)
        with pytest.raises(RuntimeError, match="alibi slopes must be canonical"):
            torch.ops.fused_attention.attention(q, k, v, None, None, slopes, None, None, False, -1, -1, 0.0, 0.25,
                                                0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("page_size", [None, 3, 16])
@pytest.mark.parametrize(
    "batch,length,dim",
    [pytest.param(2, 4700, 128, id="long"), pytest.param(20, 500, 64, id="short")],  # 2 x 9 chunks; 20 x 1
)
def test_sweeps_over_kv_heads_match_tasks_per_head_bit_for_bit(dtype, page_size, batch, length, dim):
    """FlashAttention's layout (token rows of every kv head side by side): with 8 chunks of keys or more a
    thread (one thread here) the decode tasks sweep every kv head 64 keys at a time; with 16 threads they
    take one kv head each. The two read the same keys in the same blocks, so output and lse agree bit for
    bit (ALiBi and softcap per query head), also where pages of 3 tokens straddle the sweeps' edges and a
    window starts the keys mid-page; long caches merge their chunks, short ones (one chunk each) are written
    directly. 3 query rows a kv head: no AMX tiles (they take 4 and more, and no sweeps)."""
    gen = torch.Generator().manual_seed(23)
    hkv, group = 4, 3
    q = torch.randn(batch, 1, hkv * group, dim, generator=gen).to(dtype)
    k, v = (torch.randn(batch, length, hkv, dim, generator=gen).to(dtype) for _ in range(2))
    kwargs = {"cache_seqlens": torch.randint(length - 90, length + 1, (batch,), generator=gen, dtype=torch.int32),
              "window_size": (length - 197, 0), "alibi_slopes": torch.rand(hkv * group, generator=gen),
              "softcap": 30.0, "return_lse": True, "backend": "cpu"}
    if page_size is not None:
        pages = -(-length // page_size)
        pad = pages * page_size - length
        k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (k, v))
        order = torch.randperm(batch * pages, generator=gen)
        k, v = (x.reshape(batch * pages, page_size, hkv, dim)[order.argsort()].contiguous() for x in (k, v))
        kwargs["block_table"] = order.reshape(batch, pages).to(torch.int32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 16):
            torch.set_num_threads(n)
            with torch.no_grad():
                results.append(fa.attention_with_kvcache(q, k, v, **kwargs))
    finally:
        torch.set_num_threads(threads)
    (out_1, lse_1), (out_16, lse_16) = results
    assert torch.equal(out_1, out_16) and torch.equal(lse_1, lse_16)
