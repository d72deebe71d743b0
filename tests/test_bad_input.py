"""Bad input gets a clear ValueError/TypeError (also a RuntimeError) naming the argument, and mutates nothing.

Plus the edge cases that are not errors: empty sizes, NaN, and where we are stricter than torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_policy
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left

import fused_attention
from fused_attention import scaled_dot_product_attention as sdpa
from fused_attention import varlen_attention
from fused_attention.backends import select
from fused_attention.inputs import canonicalize

B, H, L, S, E = 2, 4, 5, 7, 8


def _qkv(dtype=torch.float32, **shapes):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(shapes.get("q", (B, H, L, E)), generator=g, dtype=dtype)
    k = torch.randn(shapes.get("k", (B, H, S, E)), generator=g, dtype=dtype)
    v = torch.randn(shapes.get("v", (B, H, S, E)), generator=g, dtype=dtype)
    return q, k, v


def _tensors(args, kwargs):
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


def _dense(t):
    return not t.is_nested and t.layout == torch.strided


def _snapshot(t):
    if t.device.type == "meta" or t.is_nested:
        return None
    if isinstance(t, CausalBias):
        # Its tensor storage is uninitialized memory (it may hold NaN, and NaN != NaN); its meaning is its fields.
        return (t.variant, t.seq_len_q, t.seq_len_kv)
    return t.detach().clone()


def _unchanged(t, snap):
    if isinstance(snap, tuple):
        return (t.variant, t.seq_len_q, t.seq_len_kv) == snap
    return torch.equal(t, snap)


def expect_error(cls, names, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ``cls`` (also a RuntimeError) naming ``names``; inputs are untouched."""
    tensors = _tensors(args, kwargs)
    before = [(t._version, tuple(t.shape), t.stride() if _dense(t) else None, _snapshot(t)) for t in tensors]
    with pytest.raises(cls) as info:
        fn(*args, **kwargs)
    e = info.value
    assert isinstance(e, (ValueError, TypeError)) and isinstance(e, RuntimeError), type(e).__mro__
    for name in (names,) if isinstance(names, str) else names:
        assert name in str(e), f"{name!r} not named in: {e}"
    for t, (version, shape, stride, snap) in zip(tensors, before):
        assert t._version == version and tuple(t.shape) == shape
        if snap is not None and stride is not None:
            assert t.stride() == stride and _unchanged(t, snap)
        elif snap is not None:  # sparse: compared densely
            assert torch.equal(t.to_dense(), snap.to_dense())
    return e


def _meta(t):
    return t.to("meta")


def _nested_query():
    return torch.nested.nested_tensor([torch.randn(H, L, E), torch.randn(H, L + 1, E)], layout=torch.jagged)


# (id, error class, names the message must contain, (q, k, v) -> (args, kwargs))
SDPA_CASES = [
    ("1d_query", ValueError, "query", lambda q, k, v: ((q[0, 0, 0], k, v), {})),
    ("head_dim_mismatch", ValueError, "key", lambda q, k, v: ((q, k[..., :4], v), {})),
    ("value_length_mismatch", ValueError, "value", lambda q, k, v: ((q, k, v[:, :, :-1]), {})),
    ("dtype_mismatch", TypeError, "key", lambda q, k, v: ((q, k.double(), v), {})),
    ("device_mismatch", ValueError, ("key", "meta"), lambda q, k, v: ((q, _meta(k), v), {})),
    ("int_dtype", TypeError, "query", lambda q, k, v: ((q.int(), k.int(), v.int()), {})),
    ("sparse_query", TypeError, ("query", "dense"), lambda q, k, v: ((q.detach().to_sparse(), k, v), {})),
    ("sparse_value", TypeError, ("value", "dense"), lambda q, k, v: ((q, k, v.detach().to_sparse()), {})),
    ("sparse_key_lengths", TypeError, ("key_lengths", "dense"),
     lambda q, k, v: ((q, k, v), {"key_lengths": torch.tensor([S, 1]).to_sparse()})),
    ("sparse_alibi", TypeError, ("alibi_slopes", "dense"),
     lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.ones(q.shape[1]).to_sparse()})),
    ("sparse_sinks", TypeError, ("sinks", "dense"), lambda q, k, v: ((q, k, v), {"sinks": torch.ones(q.shape[1]).to_sparse()})),
    ("sparse_mask", TypeError, ("attn_mask", "dense"),
     lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(L, S, dtype=torch.bool).to_sparse()})),
    ("int_key", TypeError, "key", lambda q, k, v: ((q, k.long(), v), {})),
    ("gqa_not_divisible", ValueError, "enable_gqa",
     lambda q, k, v: ((q, k[:, :3], v[:, :3]), {"enable_gqa": True})),
    ("gqa_no_key_heads", ValueError, "enable_gqa",  # was a ZeroDivisionError
     lambda q, k, v: ((q, k[:, :0], v[:, :0]), {"enable_gqa": True})),
    ("heads_mismatch_without_gqa", ValueError, ("key", "enable_gqa"), lambda q, k, v: ((q, k[:, :2], v[:, :2]), {})),
    ("mask_not_broadcast", ValueError, "attn_mask",
     lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(L + 1, S, dtype=torch.bool)})),
    ("mask_int_dtype", TypeError, "attn_mask",
     lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(L, S, dtype=torch.int32)})),
    ("mask_float64_for_float32", TypeError, "attn_mask",
     lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(L, S, dtype=torch.float64)})),
    ("dropout_negative", ValueError, "dropout_p", lambda q, k, v: ((q, k, v), {"dropout_p": -0.1})),
    ("dropout_above_one", ValueError, "dropout_p", lambda q, k, v: ((q, k, v), {"dropout_p": 1.5})),
    ("dropout_nan", ValueError, "dropout_p", lambda q, k, v: ((q, k, v), {"dropout_p": float("nan")})),
    ("dropout_vector", TypeError, "dropout_p", lambda q, k, v: ((q, k, v), {"dropout_p": torch.tensor([0.1])})),
    ("scale_bool_tensor", TypeError, "scale", lambda q, k, v: ((q, k, v), {"scale": torch.tensor(True)})),
    ("window_below_minus_one", ValueError, "window_size", lambda q, k, v: ((q, k, v), {"window_size": (-2, 0)})),
    ("window_one_entry", TypeError, "window_size", lambda q, k, v: ((q, k, v), {"window_size": (1,)})),
    ("window_float", TypeError, "window_size", lambda q, k, v: ((q, k, v), {"window_size": (1.5, 2)})),
    ("alibi_wrong_shape", ValueError, "alibi_slopes",
     lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.rand(H + 1)})),
    ("alibi_float16", TypeError, "alibi_slopes",
     lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.rand(H, dtype=torch.float16)})),
    ("softcap_zero", ValueError, "softcap", lambda q, k, v: ((q, k, v), {"softcap": 0.0})),
    ("softcap_negative", ValueError, "softcap", lambda q, k, v: ((q, k, v), {"softcap": -1.0})),
    ("key_lengths_wrong_shape", ValueError, "key_lengths",
     lambda q, k, v: ((q, k, v), {"key_lengths": torch.full((B + 1,), S)})),
    ("key_lengths_float", TypeError, "key_lengths",
     lambda q, k, v: ((q, k, v), {"key_lengths": torch.full((B,), float(S))})),
    ("key_lengths_negative", ValueError, "key_lengths",
     lambda q, k, v: ((q, k, v), {"key_lengths": torch.tensor([S, -1])})),
    ("key_lengths_too_long", ValueError, "key_lengths",
     lambda q, k, v: ((q, k, v), {"key_lengths": torch.tensor([S + 1, S], dtype=torch.int32)})),
    ("causal_with_mask", ValueError, ("attn_mask", "is_causal"),
     lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(L, S, dtype=torch.bool), "is_causal": True})),
    ("causal_bias_with_is_causal", ValueError, ("attn_mask", "is_causal"),
     lambda q, k, v: ((q, k, v), {"attn_mask": causal_lower_right(L, S), "is_causal": True})),
    ("causal_bias_wrong_lengths", ValueError, "attn_mask",
     lambda q, k, v: ((q, k, v), {"attn_mask": causal_upper_left(L, S + 1)})),
    ("unknown_backend", ValueError, "backend", lambda q, k, v: ((q, k, v), {"backend": "nope"})),
    ("nested_query", TypeError, "query", lambda q, k, v: ((_nested_query(), k, v), {})),
]


@pytest.mark.parametrize("cls, names, make", [c[1:] for c in SDPA_CASES], ids=[c[0] for c in SDPA_CASES])
def test_sdpa_bad_input(cls, names, make):
    args, kwargs = make(*_qkv())
    expect_error(cls, names, sdpa, *args, **kwargs)


@pytest.mark.parametrize("case", ["int_dtype", "dtype_mismatch", "causal_with_mask", "mask_not_broadcast"])
def test_sdpa_bad_input_on_meta_tensors(case):
    """Validation needs shapes and dtypes only: meta tensors get the same errors."""
    _, cls, names, make = next(c for c in SDPA_CASES if c[0] == case)
    args, kwargs = make(*(_meta(t) for t in _qkv()))
    kwargs = {n: _meta(a) if isinstance(a, torch.Tensor) else a for n, a in kwargs.items()}
    expect_error(cls, names, sdpa, *args, **kwargs)


# Shared arguments where torch raises a RuntimeError: ours must be catchable the same way.
TORCH_RAISES = [
    "1d_query", "head_dim_mismatch", "dtype_mismatch", "device_mismatch", "int_dtype", "gqa_not_divisible",
    "heads_mismatch_without_gqa", "mask_not_broadcast", "mask_int_dtype", "mask_float64_for_float32",
    "causal_with_mask",
]


@pytest.mark.parametrize("case", TORCH_RAISES)
def test_where_torch_raises_we_raise_a_runtime_error(case):
    make = next(c[3] for c in SDPA_CASES if c[0] == case)
    args, kwargs = make(*_qkv())
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(*args, **kwargs)
    with pytest.raises(RuntimeError):
        sdpa(*args, **kwargs)


def test_value_length_differing_from_key_is_rejected_though_torch_cpu_accepts_it():
    q, k, v = _qkv()
    v = v[:, :, :-1]
    assert F.scaled_dot_product_attention(q, k, v).shape == (B, H, L, E)  # torch CPU: no error
    expect_error(ValueError, "value", sdpa, q, k, v)


def _packed(total_q=9, total_k=11, hq=4, hk=2, d=E):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(total_q, hq, d, generator=g), torch.randn(total_k, hk, d, generator=g),
            torch.randn(total_k, hk, d, generator=g))


CU_Q, CU_K = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 11], dtype=torch.int32)

# (id, error class, names, (q, k, v, cu_q, cu_k) -> args of varlen_attention)
VARLEN_CASES = [
    ("cu_not_increasing", ValueError, "cu_seqlens_q",
     lambda q, k, v, cq, ck: (q, k, v, torch.tensor([0, 6, 4, 9]), torch.tensor([0, 3, 6, 11]), 6, 6)),
    ("cu_wrong_last", ValueError, "cu_seqlens_k", lambda q, k, v, cq, ck: (q, k, v, cq, ck - (ck == 11).int(), 5, 6)),
    ("cu_not_from_zero", ValueError, "cu_seqlens_q",
     lambda q, k, v, cq, ck: (q, k, v, torch.tensor([1, 4, 9]), ck, 5, 6)),
    ("cu_lengths_differ", ValueError, ("cu_seqlens_q", "cu_seqlens_k"),
     lambda q, k, v, cq, ck: (q, k, v, cq, torch.tensor([0, 2, 6, 11]), 5, 6)),
    ("cu_float", TypeError, "cu_seqlens_q", lambda q, k, v, cq, ck: (q, k, v, cq.float(), ck, 5, 6)),
    ("k_dtype", TypeError, "q, k and v", lambda q, k, v, cq, ck: (q, k.double(), v, cq, ck, 5, 6)),  # its names
    ("q_2d", ValueError, "q", lambda q, k, v, cq, ck: (q[:, 0], k, v, cq, ck, 5, 6)),
    ("k_heads_not_dividing", ValueError, "k heads",
     lambda q, k, v, cq, ck: (q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1), cq, ck, 5, 6)),
    ("k_no_heads", ValueError, "k heads",  # was a ZeroDivisionError
     lambda q, k, v, cq, ck: (q, k[:, :0], v[:, :0], cq, ck, 5, 6)),
    ("max_seqlen_q_too_small", ValueError, "max_seqlen_q", lambda q, k, v, cq, ck: (q, k, v, cq, ck, 4, 6)),
    ("max_seqlen_k_too_small", ValueError, "max_seqlen_k", lambda q, k, v, cq, ck: (q, k, v, cq, ck, 5, 5)),
    ("max_seqlen_q_float", ValueError, "max_seqlen_q", lambda q, k, v, cq, ck: (q, k, v, cq, ck, 5.0, 6)),
    ("max_seqlen_k_vector", ValueError, "max_seqlen_k",
     lambda q, k, v, cq, ck: (q, k, v, cq, ck, 5, torch.tensor([6]))),
    ("max_seqlen_k_bool", ValueError, "max_seqlen_k", lambda q, k, v, cq, ck: (q, k, v, cq, ck, 5, True)),
]


@pytest.mark.parametrize("cls, names, make", [c[1:] for c in VARLEN_CASES], ids=[c[0] for c in VARLEN_CASES])
def test_varlen_bad_input(cls, names, make):
    args = make(*_packed(), CU_Q.clone(), CU_K.clone())
    expect_error(cls, names, varlen_attention, *args)


# Offsets that pass the shape and dtype checks; their values are wrong.
BAD_OFFSETS = {
    "not_increasing": ([0, 5, 3, 9], [0, 4, 6, 11]),
    "past_the_end": ([0, 3, 4000], [0, 6, 11]),
    "not_from_zero": ([2, 4, 9], [0, 6, 11]),
    "short_of_the_end": ([0, 4, 9], [0, 6, 10]),
}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("case", BAD_OFFSETS)
def test_varlen_offsets_are_checked_by_the_ops(backend, case):
    """Under torch.compile the Python checks of cu_seqlens' values cannot run (values are unknown while
    tracing): the ops check them. The cpu op read and wrote out of bounds (a crash) and the torch op gave
    an output from the wrong rows."""
    if backend == "cpu" and fused_attention.backends.BACKENDS["cpu"].unavailable_reason():
        pytest.skip("the cpu extension is not built")
    q, k, v = _packed()
    cq, ck = (torch.tensor(c, dtype=torch.int32) for c in BAD_OFFSETS[case])

    def call(q, k, v, cq, ck):
        return varlen_attention(q, k, v, cq, ck, 6, 6, is_causal=True, backend=backend)

    with pytest.raises(RuntimeError, match="cu_seqlens_[qk]"):
        torch.compile(call, fullgraph=True, backend="eager")(q, k, v, cq, ck)


def test_zero_query_heads_give_an_empty_output():
    """No query heads, any key heads: an empty result, as torch's SDPA (the torch backend divided by 0)."""
    q, k, v = _packed()
    for backend in ("torch", "cpu"):
        out = varlen_attention(q[:, :0].requires_grad_(), k, v, CU_Q, CU_K, 5, 6, backend=backend)
        assert out.shape == (9, 0, E)
        out.sum().backward()


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_varlen_without_any_heads_gives_an_empty_output(backend):
    """No query and no key heads: an empty result, as dense attention without heads gives; the cpu op
    refused it with a RuntimeError naming no argument (query heads not a multiple of 0)."""
    if fused_attention.backends.BACKENDS[backend].unavailable_reason():
        pytest.skip(fused_attention.backends.BACKENDS[backend].unavailable_reason())
    q, k, v = (t[:, :0].requires_grad_() for t in _packed(d=16))
    out, lse = varlen_attention(q, k, v, CU_Q, CU_K, 5, 6, is_causal=True, return_lse=True, backend=backend)
    assert out.shape == (9, 0, 16) and lse.shape == (0, 9)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v)]


def test_varlen_valid_baseline_runs():
    """The varlen cases above each break exactly one thing: the unbroken call works."""
    q, k, v = _packed()
    assert varlen_attention(q, k, v, CU_Q, CU_K, 5, 6).shape == q.shape


def test_varlen_max_seqlen_takes_any_integer_scalar():
    """flash_attn code passes NumPy ints and 0-d tensors (``(cu[1:] - cu[:-1]).max()``); both were refused."""
    q, k, v = _packed()
    expected = varlen_attention(q, k, v, CU_Q, CU_K, 5, 6)
    lengths = CU_K[1:] - CU_K[:-1]
    out = varlen_attention(q, k, v, CU_Q, CU_K, np.int64(5), lengths.max())
    assert torch.equal(out, expected)


def test_sdpa_valid_baseline_runs():
    q, k, v = _qkv()
    out = sdpa(q, k, v, window_size=(2, 1), alibi_slopes=torch.rand(H), softcap=5.0,
               key_lengths=torch.tensor([S, 0]))
    assert out.shape == (B, H, L, E) and out[1].eq(0).all() and out[0].ne(0).any()


@pytest.mark.parametrize("b, l, s", [(0, L, S), (B, 0, S), (B, L, 0), (0, 0, 0)], ids=["B0", "L0", "S0", "all0"])
@pytest.mark.parametrize("extension", [None, "softcap", "key_lengths"])
def test_empty_sizes_match_torch(b, l, s, extension):
    q, k, v = _qkv(q=(b, H, l, E), k=(b, H, s, E), v=(b, H, s, E + 2))
    kwargs = {"softcap": {"softcap": 30.0}, "key_lengths": {"key_lengths": torch.full((b,), s)}}.get(extension, {})
    expected = F.scaled_dot_product_attention(q, k, v)
    out = sdpa(q, k, v, **kwargs)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if s == 0:
        assert torch.equal(out, torch.zeros_like(expected))


@pytest.mark.parametrize("b, l, s", [(0, L, S), (B, 0, S), (B, L, 0)], ids=["B0", "L0", "S0"])
def test_empty_sizes_backward(b, l, s):
    q, k, v = (t.requires_grad_() for t in _qkv(q=(b, H, l, E), k=(b, H, s, E), v=(b, H, s, E)))
    out, lse = sdpa(q, k, v, return_lse=True, alibi_slopes=torch.rand(H))
    assert lse.shape == (b, H, l) and (s > 0 or bool((lse == float("-inf")).all()))
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or (g.shape == t.shape and g.isfinite().all()) for g, t in zip(grads, (q, k, v)))


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_no_heads_give_an_empty_output(backend):
    """(B, 0, L, E) attention is empty, as in torch; the cpu op refused it (heads not a multiple of 0)."""
    if fused_attention.backends.BACKENDS[backend].unavailable_reason():
        pytest.skip(fused_attention.backends.BACKENDS[backend].unavailable_reason())
    q, k, v = (t.requires_grad_() for t in _qkv(q=(B, 0, L, E), k=(B, 0, S, E), v=(B, 0, S, E)))
    out, lse = sdpa(q, k, v, return_lse=True, is_causal=True, backend=backend)
    assert out.shape == F.scaled_dot_product_attention(q, k, v).shape and lse.shape == (B, 0, L)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v)]


def _nan_rows(out):
    return out.isnan().any(-1)


@pytest.mark.parametrize("extension", [None, "softcap", "key_lengths", "alibi"])
def test_nan_in_query_propagates_to_the_same_rows_as_torch(extension):
    q, k, v = _qkv()
    q[1, 2, 3, 4] = float("nan")
    q[0, 0, 0, 0] = float("nan")
    if extension is None and select(canonicalize(q, k, v)).name == "torch":
        # The torch backend hands a plain call to torch's own fused SDPA: then it matches torch's default
        # exactly (whose CPU flash kernel drops the NaN rows, unlike the formula).
        expected = _nan_rows(F.scaled_dot_product_attention(q, k, v))
        out = sdpa(q, k, v)
    else:
        # Our own kernels follow the formula: NaN in exactly the query rows that hold a NaN (torch's math).
        kwargs = {None: {}, "softcap": {"softcap": 1e6}, "key_lengths": {"key_lengths": torch.full((B,), S)},
                  "alibi": {"alibi_slopes": torch.zeros(H)}}[extension]
        with sdpa_kernel(SDPBackend.MATH):
            expected = _nan_rows(F.scaled_dot_product_attention(q, k, v))
        assert expected.sum() == 2
        out = sdpa(q, k, v, **kwargs)
    assert torch.equal(_nan_rows(out), expected)
    assert out[~_nan_rows(out)].isfinite().all()


def test_error_classes_are_exported_and_derive_from_runtime_error():
    from fused_attention.errors import AttentionArgumentError, AttentionTypeError

    assert issubclass(AttentionArgumentError, ValueError) and issubclass(AttentionArgumentError, RuntimeError)
    assert issubclass(AttentionTypeError, TypeError) and issubclass(AttentionTypeError, RuntimeError)
    assert fused_attention.scaled_dot_product_attention is sdpa


def test_meta_tensors_give_torch_shapes():
    """Shape inference on the meta device works as with torch (no autocast lookup for 'meta')."""
    q, k, v = (_meta(t) for t in _qkv(v=(B, H, S, E + 2)))
    assert sdpa(q, k, v).shape == F.scaled_dot_product_attention(q, k, v).shape
    out, lse = sdpa(q, k, v, softcap=3.0, return_lse=True)
    assert out.shape == (B, H, L, E + 2) and lse.shape == (B, H, L) and out.device.type == "meta"


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("sinks", [False, True])
def test_head_dim_zero_gives_uniform_attention_and_its_gradients(backend, sinks):
    """Head dim 0: every score is 0, so every row attends uniformly (with the sink beside the keys), for
    every batch entry and head. The cpu backward's product over no features left the scores of the
    thread's previous (batch, head) in place: from the second one on, with a sink, dV and d sink were
    wrong (uniform rows hid it without one)."""
    if fused_attention.backends.BACKENDS[backend].unavailable_reason():
        pytest.skip(fused_attention.backends.BACKENDS[backend].unavailable_reason())
    from fused_attention.reference import reference_attention

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # (one thread's buffers serve every (batch, head): where the bug showed)
    try:
        gen = torch.Generator().manual_seed(5)
        q, k = torch.randn(3, 2, 4, 0, generator=gen), torch.randn(3, 2, 5, 0, generator=gen)
        v = torch.randn(3, 2, 5, 8, generator=gen).requires_grad_()
        kwargs = {"sinks": torch.tensor([0.5, -1.0]).requires_grad_()} if sinks else {}
        leaves = [v, *kwargs.values()]
        up = torch.randn(3, 2, 4, 8, generator=gen)
        out = sdpa(q, k, v, backend=backend, **kwargs)
        grads = torch.autograd.grad(out, leaves, up)
        refs = {}
        for dt in (torch.float32, torch.float64):  # DESIGN.md's policy: the reference in float32 and float64
            ref_leaves = [t.detach().to(dt).requires_grad_() for t in leaves]
            ref_kwargs = dict(zip(kwargs, ref_leaves[1:]))
            ref = reference_attention(q.to(dt), k.to(dt), ref_leaves[0], **ref_kwargs)[0]
            refs[dt] = (ref, torch.autograd.grad(ref, ref_leaves, up.to(dt)))
        assert_policy(out, refs[torch.float32][0], refs[torch.float64][0], 2, "output")
        for i, got in enumerate(grads):
            assert_policy(got, refs[torch.float32][1][i], refs[torch.float64][1][i], 3, f"gradient {i}")
    finally:
        torch.set_num_threads(previous)
