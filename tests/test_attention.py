"""Every backend against the float64 reference: features, their pairs and named triples, dtypes, shapes."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import (
    FLOAT32_ARITHMETIC,
    assert_policy,
    check_attention,
    cpu_backends,
    multiple_for,
    rand,
    require,
    require_call,
    shared_backends,
)
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left

import fused_attention
from fused_attention.reference import reference_attention

B, HQ, L, S, E = 2, 4, 37, 53, 40


def _inputs(features, dtype=torch.float32, batch=B, hq=HQ, seq_q=L, seq_k=S, head_dim=E):
    hkv = hq // 2 if "gqa" in features else hq
    ev = 24 if "value_head_dim" in features else head_dim
    q = rand(batch, hq, seq_q, head_dim, dtype=dtype, requires_grad=True)
    k = rand(batch, hkv, seq_k, head_dim, dtype=dtype, requires_grad=True)
    v = rand(batch, hkv, seq_k, ev, dtype=dtype, requires_grad=True)
    kwargs: dict = {}
    if "gqa" in features:
        kwargs["enable_gqa"] = True
    if "causal" in features:
        kwargs["is_causal"] = True
    if "causal_lower_right" in features:
        kwargs["attn_mask"] = causal_lower_right(seq_q, seq_k)
    if "window" in features:
        kwargs["window_size"] = (7, 3)
    if "alibi" in features:
        kwargs["alibi_slopes"] = torch.rand(hq) + 0.05  # slope gradients: test_alibi_slopes_gradient_*
    if "softcap" in features:
        kwargs["softcap"] = 2.0
    if "key_lengths" in features:
        kwargs["key_lengths"] = torch.tensor([seq_k - 10, 5][:batch])
    if "bool_mask" in features:
        kwargs["attn_mask"] = torch.rand(batch, 1, seq_q, seq_k) > 0.3  # broadcast over heads
    if "float_mask" in features:
        kwargs["attn_mask"] = rand(1, hq, seq_q, seq_k, dtype=dtype, requires_grad=True)
    if "scale" in features:
        kwargs["scale"] = 0.3
    return q, k, v, kwargs


FEATURES = [
    "causal", "causal_lower_right", "window", "alibi", "softcap", "key_lengths", "bool_mask", "float_mask",
    "gqa", "value_head_dim", "scale",
]
_MASKS = {"causal", "causal_lower_right", "bool_mask", "float_mask"}  # at most one: torch's rule
PAIRS = [p for p in itertools.combinations(FEATURES, 2) if len(_MASKS & set(p)) < 2]
TRIPLES = [
    ("causal", "window", "alibi"),
    ("softcap", "alibi", "float_mask"),
    ("gqa", "key_lengths", "window"),
    ("causal_lower_right", "alibi", "softcap"),
    ("gqa", "bool_mask", "value_head_dim"),
    ("window", "key_lengths", "float_mask"),
    ("gqa", "softcap", "causal"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("feature", ["plain", *FEATURES])
def test_single_feature(backend, feature, dtype):
    torch.manual_seed(0)
    q, k, v, kwargs = _inputs({feature}, dtype)
    check_attention(backend, q, k, v, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(FLOAT32_ARITHMETIC & set(shared_backends())))
def test_16bit_inputs_meet_the_float32_arithmetic_bound(name, dtype):
    """Backends that promise float32 arithmetic for 16-bit inputs are held to the bound of the reference
    with float32 intermediates (conftest.FLOAT32_ARITHMETIC), which 16-bit arithmetic exceeds."""
    q, k, v, kwargs = _inputs({"alibi", "causal", "gqa"}, dtype)
    check_attention(name, q, k, v, **kwargs)


@pytest.mark.parametrize("features", PAIRS + TRIPLES, ids="+".join)
def test_feature_combinations(backend, features):
    torch.manual_seed(1)
    q, k, v, kwargs = _inputs(set(features))
    check_attention(backend, q, k, v, **kwargs)


@pytest.mark.parametrize(
    "seq_q,seq_k,head_dim",
    [(1, 1, 8), (1, 97, 72), (97, 1, 80), (97, 61, 40), (61, 97, 40), (1025, 33, 16), (33, 1025, 16)],
)
@pytest.mark.parametrize("features", [(), ("causal",), ("window", "alibi"), ("key_lengths", "softcap")], ids=str)
def test_odd_sizes(backend, seq_q, seq_k, head_dim, features):
    torch.manual_seed(2)
    q, k, v, kwargs = _inputs(set(features), seq_q=seq_q, seq_k=seq_k, head_dim=head_dim, hq=2)
    if "key_lengths" in kwargs:
        kwargs["key_lengths"] = torch.tensor([seq_k, seq_k // 2])
    check_attention(backend, q, k, v, **kwargs)


def test_alibi_twelve_heads_per_batch_slopes(backend):
    torch.manual_seed(3)
    q, k, v, kwargs = _inputs({"alibi", "causal"}, hq=12)
    kwargs["alibi_slopes"] = torch.rand(B, 12)
    check_attention(backend, q, k, v, **kwargs)


@pytest.mark.parametrize("hkv", [1, 2])
def test_gqa_and_mqa(backend, hkv):
    torch.manual_seed(4)
    q = rand(B, 6, L, E, requires_grad=True)
    k = rand(B, hkv, S, E, requires_grad=True)
    v = rand(B, hkv, S, E, requires_grad=True)
    check_attention(backend, q, k, v, enable_gqa=True, is_causal=True)


@pytest.mark.parametrize("seq_k", [1, 5])
def test_many_rows_against_few_keys(backend, seq_k):
    """122 rows against a key or five at head dim 128 (found by a random sweep): the cpu forward computed
    each score block a whole 64-key panel wide, each score one chain of 128 float32 FMAs, and a float32 lse
    came out 1.12x the policy's bound (torch's own float32 product at that shape is within half an ulp)."""
    require(backend, torch.float32)
    gen = torch.Generator().manual_seed(0)
    q = rand(2, 2, 122, 128, gen=gen)
    k, v = rand(2, 2, seq_k, 128, gen=gen), rand(2, 2, seq_k, 128, gen=gen)
    check_attention(backend, q, k, v)


@pytest.mark.parametrize("mask", ["lower_right", "window"])
@pytest.mark.parametrize("backend", cpu_backends())  # (at 581 keys the interpreted triton takes minutes)
def test_alibi_rows_climbing_to_a_causal_diagonal(backend, mask):
    """ALiBi rows whose scores climb ~20 from one key block to the diagonal's (found by a random sweep,
    float32): the cpu forward kept the previous block's reference for the masked diagonal block, took exp
    of arguments ~20 and rounded lse = reference + log(sum) in float, 7x the float32 reference's error."""
    require(backend, torch.float32)
    gen = torch.Generator().manual_seed(144897)
    q = rand(3, 12, 116, 80, requires_grad=True, gen=gen)
    k, v = rand(3, 3, 581, 80, requires_grad=True, gen=gen), rand(3, 3, 581, 64, requires_grad=True, gen=gen)
    slopes = torch.rand(12, generator=gen)
    masks = {"lower_right": {"attn_mask": causal_lower_right(116, 581)}, "window": {"window_size": (-1, 0)}}
    check_attention(backend, q, k, v, enable_gqa=True, scale=0.05 / 80**0.5, alibi_slopes=slopes, **masks[mask])


def test_three_dim_inputs(backend):
    torch.manual_seed(5)
    q, k, v = rand(3, L, E, requires_grad=True), rand(3, S, E, requires_grad=True), rand(3, S, E, requires_grad=True)
    check_attention(backend, q, k, v, attn_mask=rand(3, L, S))
    check_attention(backend, q, k, v, key_lengths=torch.tensor([S, 3, 0]))


def test_extra_batch_dims_and_broadcast(backend):
    torch.manual_seed(6)
    q = rand(2, 3, HQ, L, E, requires_grad=True)
    k = rand(1, 3, HQ, S, E, requires_grad=True)  # batch broadcast
    v = rand(2, 1, HQ, S, E, requires_grad=True)
    mask = rand(3, 1, L, S, requires_grad=True)  # broadcast over the leading batch and the heads
    check_attention(backend, q, k, v, attn_mask=mask)


def test_head_broadcast_without_gqa(backend):
    torch.manual_seed(7)
    q = rand(B, HQ, L, E, requires_grad=True)
    k, v = rand(B, 1, S, E, requires_grad=True), rand(B, 1, S, E, requires_grad=True)
    check_attention(backend, q, k, v)


@pytest.mark.parametrize("mask_shape", [(S,), (L, 1), (1, S), (B, 1, 1, S), (HQ, L, S), (B, HQ, L, S)], ids=str)
def test_broadcast_float_mask_gradient(backend, mask_shape):
    torch.manual_seed(8)
    q, k, v, _ = _inputs(set())
    mask = rand(*mask_shape, requires_grad=True)
    check_attention(backend, q, k, v, attn_mask=mask)


def test_non_contiguous_inputs(backend):
    torch.manual_seed(9)
    # (B, L, H, D) storage seen as (B, H, L, D), as after a projection and a view
    q = rand(B, L, HQ, E).transpose(1, 2).requires_grad_()
    k = rand(B, S, HQ, 2 * E)[..., ::2].transpose(1, 2).requires_grad_()
    v = rand(B, S, HQ, E).transpose(1, 2).requires_grad_()
    mask = rand(S, L).t()
    check_attention(backend, q, k, v, attn_mask=mask, alibi_slopes=torch.rand(HQ))


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"is_causal": True}, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]),
        ({"attn_mask": causal_lower_right(2, 5)}, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        ({"attn_mask": causal_upper_left(2, 5)}, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]),
        ({"window_size": (1, 0)}, [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]),
        ({"is_causal": True, "window_size": (1, 0)}, [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]),
        ({"key_lengths": torch.tensor([3])}, [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]),
    ],
)
def test_worked_mask_examples(backend, kwargs, expected):
    """The issue's worked example, L=2, S=5: with value = identity the output row is the softmax row."""
    q, k = torch.randn(1, 1, 2, 4, dtype=torch.float64), torch.randn(1, 1, 5, 4, dtype=torch.float64)
    v = torch.eye(5, dtype=torch.float64).reshape(1, 1, 5, 5)
    require_call(backend, q, k, v, **kwargs)
    out = fused_attention.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
    assert torch.equal((out[0, 0] > 0).int(), torch.tensor(expected, dtype=torch.int32))
    check_attention(backend, q.requires_grad_(), k.requires_grad_(), v, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("seq_q", "seq_k"), [(L, 8), (L, 1500), (1, 1500)], ids=["short", "blocks", "decode"])
@pytest.mark.parametrize("rows", ["partly", "entirely"])
def test_masks_of_the_lowest_float_as_hugging_face_builds_them(backend, dtype, seq_q, seq_k, rows):
    """A float mask holding the dtype's lowest value (Hugging Face's eager and 4-D masks): partly hidden
    rows see their keys, rows it hides entirely are uniform, as in torch; no NaN (the cpu kernel's exp
    took shift x log2 e past float's range: NaN rows, in every layer after the first, from a padded
    batch). 1500 keys: a whole 512-key block of a row hidden; one query row: the cpu decode path. The
    triton kernels: the 16-bit forward's log2 units overflowed such a mask to -inf (output 0), and the
    backward's P = exp(S - lse) was 1 on every key, float32's lse having lost log(row sum)."""
    require(backend, dtype)
    torch.manual_seed(12)
    q, k, v, _ = _inputs(set(), dtype, seq_q=seq_q, seq_k=seq_k)
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(B, 1, seq_q, seq_k, dtype=dtype)
    if rows == "partly":
        mask[:, :, :, : seq_k - 3] = lowest  # the last 3 keys visible
        mask[1, :, 1::2, :5] = 0  # and in batch 1 every other row the first 5 too
    else:
        mask[1, :, ::2] = lowest  # batch 1: every other row sees nothing
    check_attention(backend, q, k, v, attn_mask=mask.requires_grad_())


def test_float32_gradients_of_rows_with_a_large_lse(backend):
    """Rows whose lse is a few hundred or more: its float32 rounding (half an ulp of |lse|) is a same-signed
    relative error in every P = exp(S - lse) of the row, which the triton backward took into dK and dV
    (scores of 1000 and 999.5: dV 12x the bound; ALiBi distances of about 185, top-left causal: 1.3x); it
    renormalizes float32 rows by their sum of exp(S - lse) now. dQ = dS K there multiplies dS's rounding
    by |K| = 1000 on every backend alike: its bound is not checked in the first case."""
    require(backend, torch.float32)
    q = torch.zeros(1, 1, 1, 16)
    q[..., 0] = 1
    k = torch.zeros(1, 1, 2, 16)
    k[0, 0, :, 0] = torch.tensor([1000.0, 999.5])
    v = torch.randn(1, 1, 2, 16, generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(1, 1, 1, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(123))
    grads = {}
    for dtype, run in ((torch.float32, lambda *t: fused_attention.scaled_dot_product_attention(
            *t, scale=1.0, backend=backend)), (torch.float32, None), (torch.float64, None)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = run(*leaves) if run else reference_attention(*leaves, scale=1.0)[0]
        grads[len(grads)] = torch.autograd.grad(out, leaves, upstream.to(dtype))
    for i, name in ((1, "k"), (2, "v")):
        assert_policy(grads[0][i], grads[1][i], grads[2][i], 3, f"grad {name}")
    torch.manual_seed(16)
    q, k, v, _ = _inputs(set(), seq_q=16, seq_k=200)
    check_attention(backend, q, k, v, is_causal=True, alibi_slopes=torch.ones(HQ))


def test_float32_gradients_of_a_key_holding_most_of_its_row(backend):
    """A float32 row whose weight sits on one key, P = 0.9998, the next 8.5 score units below (scale 50,
    GQA and ALiBi, as the fuzzed case that found it): that key's dS = P (dP - delta) is the difference of
    two numbers 1e-4 apart relative (dP 4.4984, delta 4.4991), so a float32 ulp of either that the other
    does not share is a large part of it, times the scale and |q| in dK (|k| in dQ). The triton backward
    took delta from the stored output, scaled dO by 1 / c in the dQ pass and multiplied dP = dO V in the
    dK/dV pass in another order (a few ulps apart): dK 3.6x, dQ 8.3x the bound on 11 of 12 upstream
    gradients of this case. It holds delta as a pair now (see the dQ pass)."""
    require(backend, torch.float32)
    torch.manual_seed(0)
    q = rand(1, 2, 1, 64)
    k = rand(1, 1, 115, 64)
    v = rand(1, 1, 115, 64, requires_grad=True)
    slopes = torch.tensor([0.052, 0.0585], requires_grad=True)
    # head 0's row: q.k of 30 on key 44 (a score of 1500, the others below 1100), key 50 8.55 below it after
    # the ALiBi bias (distances 70 and 64 from the row)
    row = q[0, 0, 0].double()
    for key, qk in ((44, 30.0), (50, 30.0 - (8.55 + 0.052 * (70 - 64)) / 50)):
        k[0, 0, key] = (row * (qk / row.dot(row))).float()
    q.requires_grad_()
    k.requires_grad_()
    for seed in range(2):
        torch.manual_seed(seed)  # the upstream gradient
        check_attention(backend, q, k, v, enable_gqa=True, scale=50.0, alibi_slopes=slopes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_keys_past_key_lengths_are_never_read(backend, dtype):
    """Keys and values past a sequence's key length are not part of it (FlashAttention's varlen and
    KV-cache reading): an uninitialized buffer's NaN there left the output NaN on the torch and triton
    backends and dq, dk NaN on all three (P = 0 times NaN). Results equal those with finite padding."""
    require(backend, dtype)
    torch.manual_seed(3)
    q = rand(2, 4, 37, 16, dtype=dtype)
    k, v = rand(2, 2, 50, 16, dtype=dtype), rand(2, 2, 50, 24, dtype=dtype)
    lengths = torch.tensor([47, 31])
    up = rand(2, 4, 37, 24, dtype=dtype)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        poisoned_k[b, :, n:] = float("nan")
        poisoned_v[b, :, n:] = float("nan")
    for kwargs in ({}, {"is_causal": True}, {"window_size": (5, 3)}):
        results = []
        for keys, values in ((k, v), (poisoned_k, poisoned_v)):
            leaves = [t.clone().requires_grad_() for t in (q, keys, values)]
            out = fused_attention.scaled_dot_product_attention(
                *leaves, key_lengths=lengths, enable_gqa=True, backend=backend, **kwargs
            )
            results.append([out, *torch.autograd.grad(out, leaves, up)])
        for name, clean, poisoned in zip(("out", "dq", "dk", "dv"), *results):  # (the padding's dk, dv: 0)
            torch.testing.assert_close(poisoned, clean, rtol=0, atol=0, msg=f"{name} with {kwargs}")


@pytest.mark.parametrize("scale", [1e10, 1e-39], ids=["huge", "subnormal"])
def test_extreme_scales(backend, scale):
    """Scores of 1e10 and more (a scale torch accepts): the cpu kernel's exp argument at the row's maximum
    was |score| 2^-24 off 0 (NaN rows, or zero rows with lse -inf after a failed maximum pass). A scale
    below float's smallest normal: the cpu kernels flush it to 0, which made -inf padding NaN (zero rows);
    torch gives uniform attention."""
    require(backend, torch.float32)
    torch.manual_seed(13)
    q, k, v, _ = _inputs(set())
    for kwargs in ({}, {"is_causal": True}, {"window_size": (2, 2)}):
        check_attention(backend, q, k, v, scale=scale, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_float32_mask_of_any_query_dtype(backend, dtype):
    """A float32 mask serves queries of every dtype (as in torch). No grad: the torch backend handed such
    calls to torch's own kernel, whose CPU flash path reads a float32 mask of float64 queries wrongly
    (errors of 2 at 64 keys and more; torch 2.14); those stay on the chunked op now."""
    require(backend, dtype)
    torch.manual_seed(11)
    q, k, v, _ = _inputs(set(), dtype, seq_k=64)
    mask = torch.randn(L, 64) * 5
    check_attention(backend, q, k, v, grad=False, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fully_masked_rows_are_zero_with_finite_gradients(backend, dtype):
    require(backend, dtype)
    torch.manual_seed(10)
    q, k, v, _ = _inputs(set(), dtype)
    mask = torch.ones(B, 1, L, S, dtype=torch.bool)
    mask[:, :, ::3] = False  # every third query row sees nothing
    float_mask = torch.zeros(L, S, dtype=dtype).masked_fill(~mask[0, 0], float("-inf")).requires_grad_()
    for kwargs in ({"attn_mask": mask}, {"attn_mask": float_mask}, {"key_lengths": torch.tensor([0, 4])},
                   {"window_size": (0, 0), "key_lengths": torch.tensor([S, 0])}):
        out, lse = fused_attention.scaled_dot_product_attention(q, k, v, return_lse=True, backend=backend, **kwargs)
        leaves = [q, k, v] + ([kwargs["attn_mask"]] if kwargs.get("attn_mask") is float_mask else [])
        grads = torch.autograd.grad(out.sum(), leaves)
        assert all(torch.isfinite(g).all() for g in grads)
        assert torch.isfinite(out).all()
        if "attn_mask" in kwargs:
            assert (out[:, :, ::3] == 0).all() and (lse[:, :, ::3] == float("-inf")).all()
            assert (grads[0][:, :, ::3] == 0).all()
        check_attention(backend, q, k, v, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("logits", [1.0, 30.0], ids=["unit_logits", "large_logits"])
def test_rows_that_see_one_key_have_exactly_zero_score_gradients(backend, dtype, logits):
    """A row whose softmax is all on one key is constant in its scores: dQ and that key's dK are exactly
    0 (the dtype's reference computes 0, so the policy's bound is its absolute floor). dS = P (dP - delta)
    leaves rounding noise there unless P is exactly 1 or the kernel knows the row is one-hot; in 16 bits
    the Triton forward's lse passes through log2 units, so P lands a few ulps from 1 (an H200 run measured
    1.3e-6 for float16 dK; the interpreter 5.8e-6 with this test's output gradient)."""
    require(backend, dtype)
    torch.manual_seed(16)
    q, k, v, _ = _inputs(set(), dtype, seq_q=S)
    with torch.no_grad():
        q.mul_(logits)  # |scores| of about `logits`: lse's rounding grows with them
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],)).to(dtype)
    for kwargs, one_key in (
        ({"window_size": (0, 0)}, slice(None)),  # every row sees only its own key
        ({"is_causal": True}, slice(0, 1)),  # row 0 sees key 0 alone
        ({"key_lengths": torch.tensor([1, S])}, slice(None)),  # batch 0: every row sees key 0 alone
    ):
        out = fused_attention.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
        dq, dk = torch.autograd.grad(out, [q, k], dout)
        if "key_lengths" in kwargs:
            assert (dq[0] == 0).all() and (dk[0] == 0).all(), (dq[0].abs().max(), dk[0].abs().max())
        else:
            assert (dq[:, :, one_key] == 0).all(), dq[:, :, one_key].abs().max()
            if "window_size" in kwargs:
                assert (dk == 0).all(), dk.abs().max()
        check_attention(backend, q, k, v, **kwargs)


def test_inputs_not_mutated(backend):
    torch.manual_seed(11)
    q, k, v, kwargs = _inputs({"alibi", "float_mask", "key_lengths", "window"})
    before = [t.detach().clone() for t in (q, k, v, kwargs["attn_mask"], kwargs["alibi_slopes"], kwargs["key_lengths"])]
    out = fused_attention.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
    out.sum().backward()
    after = (q, k, v, kwargs["attn_mask"], kwargs["alibi_slopes"], kwargs["key_lengths"])
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, after))


@pytest.mark.parametrize("window", [(2**31 - 1, 2**31 - 1), (-1, 2**31 - 1), (2**31 - 1, 0)], ids=str)
def test_window_sizes_past_int32_positions(backend, window):
    """A window side as wide as an int32 allows means unbounded on that side; kernels that add it to
    int32 positions must not wrap around (the triton kernels did: rows saw no keys)."""
    require(backend, torch.float32)
    torch.manual_seed(13)
    q, k, v, _ = _inputs(set(), torch.float32)
    check_attention(backend, q, k, v, window_size=window)


@pytest.mark.parametrize("window", [(2**63 - 1, 2**63 - 1), (-1, 2**63 - 7), (2**64, 0)], ids=str)
def test_window_sizes_past_int64_positions(backend, window):
    """A window side as wide as an int64 allows, or wider, means unbounded on that side: the cpu kernels'
    int64 sums of position and window wrapped around (rows lost keys, with no error) and a wider int was
    pybind's TypeError. The reference's int64 positions would wrap too: it gets the unbounded window."""
    require(backend, torch.float32)
    torch.manual_seed(13)
    q, k, v, _ = _inputs(set(), torch.float32)
    unbounded = tuple(-1 if side > 2**62 else side for side in window)
    out = fused_attention.scaled_dot_product_attention(q, k, v, window_size=window, backend=backend)
    ref_dt, _ = reference_attention(q, k, v, window_size=unbounded)
    ref64, _ = reference_attention(q.double(), k.double(), v.double(), window_size=unbounded)
    assert_policy(out, ref_dt, ref64, 2, "output")


@pytest.mark.parametrize("softcap", [1e19, 1e37, 1e300], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softcaps_too_large_to_cap_anything(backend, dtype, softcap):
    """softcap * tanh(x / softcap) is x for such softcaps, but the kernels' multiply by 1 / softcap went
    subnormal (flushed: every score 0, the cpu backend from 1e37 in float32) or overflowed (NaN from 1e39 on
    every backend). Checked against the float64 reference, which computes the cap."""
    require(backend, dtype)
    torch.manual_seed(14)
    q, k, v, _ = _inputs({"causal"}, dtype)
    check_attention(backend, q, k, v, is_causal=True, softcap=softcap)


def test_softcaps_too_large_to_cap_anything_on_every_entry_point():
    """varlen_attention and attention_with_kvcache take the same rule as scaled_dot_product_attention: the
    result is the call without a softcap, to the bit."""
    torch.manual_seed(15)
    q, k, v = (rand(7, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    plain = fused_attention.varlen_attention(q, k, v, cu, cu, 4, 4, is_causal=True)
    capped = fused_attention.varlen_attention(q, k, v, cu, cu, 4, 4, is_causal=True, softcap=1e300)
    assert torch.equal(plain, capped)
    qc, kc, vc = rand(1, 1, 2, 16), rand(1, 9, 2, 16), rand(1, 9, 2, 16)
    plain = fused_attention.attention_with_kvcache(qc, kc, vc, cache_seqlens=9)
    capped = fused_attention.attention_with_kvcache(qc, kc, vc, cache_seqlens=9, softcap=1e300)
    assert torch.equal(plain, capped)
    # float64 computes in double: from 2**512 the call runs without the cap (to the bit), below it the cap is
    # computed (1e37, which float32 drops, against the float64 reference per sequence)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    plain = fused_attention.varlen_attention(q64, k64, v64, cu, cu, 4, 4)
    assert torch.equal(fused_attention.varlen_attention(q64, k64, v64, cu, cu, 4, 4, softcap=1e300), plain)
    out = fused_attention.varlen_attention(q64, k64, v64, cu, cu, 4, 4, softcap=1e37)
    for a, b in ((0, 3), (3, 7)):
        part = lambda t, a=a, b=b: t[a:b].transpose(0, 1)[None]  # (1, H, L, D)
        expected, _ = reference_attention(part(q64), part(k64), part(v64), softcap=1e37)
        torch.testing.assert_close(out[a:b], expected[0].transpose(0, 1), rtol=1e-12, atol=1e-12)


NONPOSITIVE_SCALE_FEATURES = [(), ("alibi",), ("alibi", "causal"), ("softcap",), ("alibi", "softcap", "window")]


def check_nonpositive_scale(backend, features, scale):
    """A scale <= 0 is the caller's right (torch takes any float): scores flip sign or vanish, and ALiBi's
    bias then stands alone. In float16 the Triton forward takes its row maximum in units of the scale
    (q flipped for a negative one, the bias divided by it), which these values must not break."""
    require(backend, torch.float16)
    torch.manual_seed(12)
    q, k, v, kwargs = _inputs(set(features), torch.float16)
    check_attention(backend, q, k, v, scale=scale, **kwargs)


@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
@pytest.mark.parametrize("features", NONPOSITIVE_SCALE_FEATURES, ids=lambda f: "+".join(f) or "plain")
def test_negative_and_zero_scale(backend, features, scale):
    check_nonpositive_scale(backend, features, scale)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes_H", "slopes_BH"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_alibi_slopes_gradient_matches_reference(backend, dtype, per_batch, causal):
    """d/d(slopes) of (H,) and per-batch (B, H) slopes (float32, as users pass them), with and without
    causal, under GQA and a non-default scale, against the reference."""
    q, k, v, kwargs = _inputs({"gqa", "scale"}, dtype)
    slopes = (torch.rand(B, HQ) if per_batch else torch.rand(HQ)) * 0.5 - 0.1  # negative slopes too
    check_attention(backend, q, k, v, alibi_slopes=slopes.requires_grad_(), is_causal=causal, **kwargs)


def test_gradcheck_float64_all_extensions(backend):
    require(backend, torch.float64)
    torch.manual_seed(13)
    q = rand(1, 2, 7, 8, dtype=torch.float64, requires_grad=True)
    k = rand(1, 1, 9, 8, dtype=torch.float64, requires_grad=True)
    v = rand(1, 1, 9, 6, dtype=torch.float64, requires_grad=True)
    mask = rand(2, 7, 9, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(2)

    def f(q, k, v, mask):
        return fused_attention.scaled_dot_product_attention(
            q, k, v, mask, enable_gqa=True, window_size=(4, 1), alibi_slopes=slopes, softcap=1.5,
            key_lengths=torch.tensor([8]), backend=backend,
        )

    assert torch.autograd.gradcheck(f, (q, k, v, mask))


def test_gradcheck_float64_dropout(backend):
    """Reseeding before each call fixes the dropout mask, so gradcheck proves the backward regenerates
    exactly the mask the forward used."""
    require(backend, torch.float64)
    torch.manual_seed(14)
    q, k, v = (rand(1, 2, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        torch.manual_seed(123)
        return fused_attention.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v))


def _dropout_keep_mask(backend, q, k, p, **kwargs):
    """Recovers the keep-mask by attending to identity values: output row i is the dropped softmax row."""
    eye = torch.eye(k.shape[-2], dtype=q.dtype).expand(*k.shape[:-1], k.shape[-2])
    torch.manual_seed(77)
    out = fused_attention.scaled_dot_product_attention(q, k, eye, dropout_p=p, backend=backend, **kwargs)
    return out != 0


def _visible(q, k, **kwargs) -> torch.Tensor:
    """Where the reference (float64, no dropout) gives a key a nonzero probability: the entries dropout
    may drop. Computed from the formula, not from the backend under test."""
    q64, k64 = q.detach().double(), k.detach().double()
    eye = torch.eye(k.shape[-2], dtype=torch.float64).expand(*k.shape[:-1], k.shape[-2])
    # (a CausalBias is never a leaf; on torch 2.6 even reading its requires_grad raises)
    ref_kwargs = {
        n: (t.detach() if isinstance(t, torch.Tensor) and not isinstance(t, CausalBias) and t.requires_grad else t)
        for n, t in kwargs.items()
    }
    return reference_attention(q64, k64, eye, **ref_kwargs)[0] != 0


def assert_kept_fraction(keep: torch.Tensor, visible: torch.Tensor, p: float) -> None:
    """Dropout keeps a fraction 1 - p of the visible entries (within 5 standard deviations) and never
    keeps a hidden one."""
    assert not (keep & ~visible).any(), "dropout kept a hidden entry"
    n = int(visible.sum())
    rate = (keep & visible).sum().item() / n
    assert abs(rate - (1 - p)) <= 5 * (p * (1 - p) / n) ** 0.5, f"kept {rate:.4f} of {n} visible, expected {1 - p}"


DROPOUT_FEATURES = [
    (), ("window",), ("causal",), ("alibi", "window"), ("gqa", "causal"), ("key_lengths", "softcap"),
    ("bool_mask",), ("float_mask", "scale"), ("causal_lower_right", "window"),
]


@pytest.mark.parametrize("features", DROPOUT_FEATURES, ids=lambda f: "+".join(f) or "plain")
def test_dropout_keeps_one_minus_p_of_visible_entries_and_matches_reference(backend, features):
    check_dropout_against_reference(backend, features, seq_k=multiple_for(backend, S))


def test_torch_dropout_mask_regenerated_independently_from_its_seed():
    """The torch backend's keep-mask (recovered with identity values) equals the mask regenerated here
    from its documented stream: the seed drawn from torch's default generator, then per query chunk a
    generator seeded ``(seed + i0 * golden) mod 2**63`` drawing uniforms over (B, H, rows, the chunk's
    key range), kept where >= p; hidden entries are never kept."""
    from fused_attention.kernels import chunked

    q, k, _, kwargs = _inputs({"window", "gqa"}, seq_k=S)
    p = 0.3
    keep = _dropout_keep_mask("torch", q.detach(), k.detach(), p, **kwargs)
    torch.manual_seed(77)  # as _dropout_keep_mask does before its call
    seed = int(torch.randint(0, 1 << 62, (1,)))
    rules = chunked.Rules(False, *kwargs["window_size"], 0.0, 1.0, p, seed)
    expected = torch.zeros_like(keep)
    step = chunked.chunk_rows(B, HQ, L, S)
    for i0 in range(0, L, step):
        i1 = min(i0 + step, L)
        j0, j1 = chunked.key_range(i0, i1, L, S, rules)
        gen = torch.Generator().manual_seed((seed + i0 * 0x9E3779B97F4A7C15) % (1 << 63))
        expected[:, :, i0:i1, j0:j1] = torch.rand(B, HQ, i1 - i0, j1 - j0, generator=gen) >= p
    assert torch.equal(keep, expected & _visible(q, k, **kwargs))


def check_dropout_against_reference(backend, features, seq_k=S):
    """The keep-mask recovered with identity values (so ``seq_k`` is also the value head dim), the
    kept fraction over the entries the reference sees, and output and gradients against the reference
    run with that same mask."""
    torch.manual_seed(15)
    q, k, v, kwargs = _inputs(set(features), seq_k=seq_k)
    p = 0.25
    require_call(backend, q, k, torch.empty(*k.shape[:-1], seq_k), **kwargs)
    keep = _dropout_keep_mask(backend, q.detach(), k.detach(), p, **kwargs)
    assert_kept_fraction(keep, _visible(q, k, **kwargs), p)
    torch.manual_seed(77)
    out = fused_attention.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend, **kwargs)

    upstream = torch.randn(out.shape, dtype=torch.float64)
    mask = kwargs.get("attn_mask")
    refs = {}
    for dt in (q.dtype, torch.float64):  # the tolerance policy, with the recovered keep-mask in both
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        ref_kwargs = dict(kwargs)
        if isinstance(mask, torch.Tensor) and not isinstance(mask, CausalBias) and mask.is_floating_point():
            ref_kwargs["attn_mask"] = mask.detach().to(dt)
        ref, _ = reference_attention(*leaves, dropout_p=p, dropout_mask=keep, **ref_kwargs)
        refs[dt] = (ref, torch.autograd.grad(ref, leaves, upstream.to(dt)))
    assert_policy(out, refs[q.dtype][0], refs[torch.float64][0], 2, "dropout output")
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(out.dtype))
    for name, g, g_dt, g64 in zip("qkv", grads, refs[q.dtype][1], refs[torch.float64][1]):
        assert_policy(g, g_dt, g64, 3, f"dropout grad {name}")


@pytest.mark.parametrize("features", [(), ("alibi", "float_mask", "window")], ids=lambda f: "+".join(f) or "plain")
def test_dropout_of_one_drops_everything(backend, features):
    """dropout_p = 1 (torch accepts it): every weight dropped, the output 0 and the gradients of q, k, v,
    a float mask and the slopes 0 (not NaN from 0 / 0 or 0 x inf); the lse is the scores' as without
    dropout. (It was refused; the torch backend's 1 / (1 - p) and the triton kernels' made NaN or inf.)"""
    torch.manual_seed(16)
    q, k, v, kwargs = _inputs(set(features), seq_k=multiple_for(backend, S))
    require_call(backend, q, k, v, **kwargs)
    out, lse = fused_attention.scaled_dot_product_attention(q, k, v, dropout_p=1.0, return_lse=True,
                                                             backend=backend, **kwargs)
    assert torch.equal(out, torch.zeros_like(out))
    _, expected_lse = fused_attention.scaled_dot_product_attention(q, k, v, return_lse=True, backend=backend,
                                                                    **kwargs)
    torch.testing.assert_close(lse, expected_lse)
    leaves = [t for t in (q, k, v, kwargs.get("attn_mask"), kwargs.get("alibi_slopes"))
              if isinstance(t, torch.Tensor) and t.requires_grad]
    for g in torch.autograd.grad(out, leaves, torch.randn_like(out)):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_scale_and_dropout_as_numpy_or_0d_tensor(backend, kind):
    """scale and dropout_p as a NumPy float32 scalar or a 0-d tensor, as torch's SDPA takes them: the same
    result as the Python float (they raised TypeError)."""
    np = pytest.importorskip("numpy")
    q, k, v, _ = _inputs(set())
    require_call(backend, q, k, v)
    wrap = (lambda x: np.float32(x)) if kind == "numpy" else (lambda x: torch.tensor(x))
    results = []
    for scale, p in ((float(wrap(0.3)), float(wrap(0.25))), (wrap(0.3), wrap(0.25))):
        torch.manual_seed(3)
        results.append(fused_attention.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=p, backend=backend))
    assert torch.equal(results[0], results[1])


def test_dropout_reproducible_with_manual_seed(backend):
    q, k, v, _ = _inputs({"alibi"})
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(fused_attention.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend=backend))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("features", [(), ("alibi",)], ids=str)
def test_autocast_casts_as_torch_does(backend, features):
    """Under autocast, q, k, v and a float32 mask are cast to the autocast dtype (as torch's SDPA casts
    them): the result has torch's dtype, equals the call on the cast inputs, and meets the policy against
    the reference on the cast inputs; gradients flow back in float32."""
    require(backend, torch.bfloat16)
    q, k, v, kwargs = _inputs(set(features))
    mask = rand(L, S)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused_attention.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend, **kwargs)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    cast = [t.detach().bfloat16().requires_grad_() for t in (q, k, v, mask)]  # the same (training) path
    expected = fused_attention.scaled_dot_product_attention(*cast[:3], attn_mask=cast[3], backend=backend, **kwargs)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    slopes = kwargs.get("alibi_slopes")
    refs = [
        reference_attention(*(t.detach().to(dt) for t in cast), alibi_slopes=slopes, **(
            {n: t for n, t in kwargs.items() if n != "alibi_slopes"}))[0]
        for dt in (torch.bfloat16, torch.float64)
    ]
    assert_policy(ours, *refs, 2, "autocast output")
    grads = torch.autograd.grad(ours.float().sum(), (q, k, v))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_backward_under_autocast_equals_backward_outside(backend):
    """A training step often runs its backward inside the autocast region too: the gradients equal those
    of the same backward outside it (the backward kernels keep their own precision)."""
    require(backend, torch.bfloat16)
    q, k, v, kwargs = _inputs({"causal", "gqa", "alibi"})
    grads = []
    for inside in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fused_attention.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
            if inside:
                grads.append(torch.autograd.grad(out.float().sum(), (q, k, v)))
        if not inside:
            grads.append(torch.autograd.grad(out.float().sum(), (q, k, v)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_three_dim_gqa_groups_the_leading_dim_as_torch_does(backend):
    """torch's enable_gqa groups dim -3, which for 3-D inputs is the leading one."""
    torch.manual_seed(16)
    q, k, v = rand(4, L, E, requires_grad=True), rand(2, S, E, requires_grad=True), rand(2, S, E, requires_grad=True)
    out = fused_attention.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend=backend)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert out.shape == expected.shape
    check_attention(backend, q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
