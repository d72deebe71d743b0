"""The ``triton`` attention backend against the float64 reference, by DESIGN.md's tolerance policy.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1``), in float32, float16 and bfloat16 (conftest's shim widens the interpreter's
bfloat16 ``tl.dot`` operands, which it would otherwise multiply as raw 16-bit patterns). The shared suite
(tests/test_attention.py, tests/test_varlen.py) runs triton through its ``backend`` fixture, on a sample
of each test family (conftest.TRITON_SAMPLE_PER_TEST); these are the same checks at the sizes and dtypes
this backend serves, and what only it promises.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_policy, check_attention, rand, serves
from test_attention import (
    DROPOUT_FEATURES,
    FEATURES,
    NONPOSITIVE_SCALE_FEATURES,
    TRIPLES,
    _inputs,
    check_dropout_against_reference,
    check_nonpositive_scale,
)
from test_attention import test_fully_masked_rows_are_zero_with_finite_gradients as fully_masked_rows_check
from test_varlen import _check

import fused_attention
from fused_attention.backends import BACKENDS
from fused_attention.inputs import canonicalize
from fused_attention.reference import reference_attention

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# float32 and float16 everywhere; bfloat16 on GPUs, and under an interpreter whose bfloat16 dot is right
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" or serves("triton", torch.bfloat16)
                                           else [])


@pytest.fixture
def backend() -> str:
    return "triton"


@pytest.fixture(autouse=True)
def _on_the_gpu_when_there_is_one():
    """With a GPU every test here runs the compiled kernels on CUDA tensors (the reference with them)."""
    if DEVICE.type != "cuda":
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)


# Every feature in float32, and in each 16-bit dtype the interpreter (or the GPU) computes right.
# Interpreted bfloat16 (~6 s a case) runs a few here; the shared suite samples it too.
_SIXTEEN_BIT = ("plain", "causal", "alibi", "softcap", "float_mask", "gqa")
_CPU_BFLOAT16 = ("causal", "softcap", "float_mask")
SINGLE = [(f, torch.float32) for f in ["plain", *FEATURES]] + [
    (f, dt) for dt in DTYPES[1:] for f in _SIXTEEN_BIT
    if not (dt == torch.bfloat16 and DEVICE.type == "cpu" and f not in _CPU_BFLOAT16)
]


@pytest.mark.parametrize("feature,dtype", SINGLE, ids=lambda x: str(x).removeprefix("torch."))
def test_single_feature(feature, dtype):
    torch.manual_seed(0)
    q, k, v, kwargs = _inputs({feature}, dtype)
    check_attention("triton", q, k, v, **kwargs)


# Pairs of the fused features (at most one mask, as torch requires), and the shared suite's triples.
_FUSED = ["causal", "window", "alibi", "softcap", "key_lengths", "float_mask", "gqa"]
COMBINATIONS = [p for p in itertools.combinations(_FUSED, 2) if p != ("causal", "float_mask")] + TRIPLES


@pytest.mark.parametrize("features", COMBINATIONS, ids="+".join)
def test_feature_combinations(features):
    torch.manual_seed(1)
    q, k, v, kwargs = _inputs(set(features))
    check_attention("triton", q, k, v, **kwargs)


# (seq_q, seq_k, head_dim, features): L = 1, 97, 130; head dims 40, 72, 128 (non-powers of two: padded
# lanes), each size once plain and once with features whose tile bounds it moves
ODD_SIZES = [
    (1, 1, 8, ("causal",)), (1, 97, 72, ("window", "alibi")), (97, 1, 40, ("key_lengths", "softcap")),
    (97, 61, 40, ("causal",)), (61, 97, 128, ("window", "alibi")), (130, 33, 72, ("key_lengths", "softcap")),
    (33, 130, 16, ("causal",)),
]


@pytest.mark.parametrize("plain", [True, False], ids=["plain", "features"])
@pytest.mark.parametrize("seq_q,seq_k,head_dim,features", ODD_SIZES, ids=lambda x: str(x))
def test_odd_sizes(seq_q, seq_k, head_dim, features, plain):
    features = () if plain else features
    torch.manual_seed(2)
    q, k, v, kwargs = _inputs(set(features), seq_q=seq_q, seq_k=seq_k, head_dim=head_dim, hq=2)
    if "key_lengths" in kwargs:
        kwargs["key_lengths"] = torch.tensor([seq_k, seq_k // 2])
    check_attention("triton", q, k, v, **kwargs)


# Windows as wide as one or more tiles (the interpreter's are 16 x 32): left-edge tiles that check only
# the left bound, interior tiles, right-edge tiles that check only the right one; the narrowest ones
# leave left-edge tiles that the right bound also cuts. The shared suite's windows are narrower.
WIDE_WINDOWS = [(47, 0), (70, 5), (31, 64), (200, -1)]


# float32 takes the kernels' IEEE path (every rule per element); 16-bit inputs the per-loop bound checks.
@pytest.mark.parametrize("window", WIDE_WINDOWS, ids=str)
@pytest.mark.parametrize(("features", "dtype"), [
    ((), torch.float16), (("key_lengths", "alibi", "causal_lower_right"), torch.float16),
    (("key_lengths", "alibi", "causal_lower_right"), torch.float32),
], ids=lambda x: "+".join(x) or "plain" if isinstance(x, tuple) else str(x))
def test_windows_wider_than_a_tile(window, features, dtype):
    torch.manual_seed(5)
    q, k, v, kwargs = _inputs(set(features), dtype=dtype, seq_q=100, seq_k=121, hq=1)
    if "key_lengths" in kwargs:
        kwargs["key_lengths"] = torch.tensor([121, 90])
    check_attention("triton", q, k, v, window_size=window, **kwargs)


# On the CPU the shared suite runs the same check in float32 and bfloat16 (its two cases, both kept by
# conftest's Triton sample); float16 is this file's
@pytest.mark.parametrize("dtype", DTYPES if DEVICE.type == "cuda" else [torch.float16], ids=str)
def test_fully_masked_rows_are_zero_with_finite_gradients(dtype):
    fully_masked_rows_check("triton", dtype)


@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
@pytest.mark.parametrize("features", NONPOSITIVE_SCALE_FEATURES, ids=lambda f: "+".join(f) or "plain")
def test_negative_and_zero_scale(features, scale):
    """Every case (the shared suite samples them): a 16-bit forward scales its row maximum, ALiBi's bias
    and softcap's tanh by deferred positive factors, which a zero or negative scale must not break."""
    check_nonpositive_scale("triton", features, scale)


def test_empty_sequences():
    """No keys: output 0, lse -inf, zero gradients; no queries: empty results."""
    q, k = rand(2, 2, 5, 16, requires_grad=True), rand(2, 2, 0, 16, requires_grad=True)
    out, lse = fused_attention.scaled_dot_product_attention(q, k, k, return_lse=True, backend="triton")
    assert torch.equal(out, torch.zeros_like(out)) and (lse == float("-inf")).all()
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(grad, torch.zeros_like(grad))
    empty = fused_attention.scaled_dot_product_attention(q[:, :, :0], q, q, backend="triton")
    assert empty.shape == (2, 2, 0, 16)


def test_value_head_dim_larger_than_query_head_dim():
    torch.manual_seed(3)
    q, k, v = rand(1, 2, 19, 24, requires_grad=True), rand(1, 2, 23, 24, requires_grad=True), rand(1, 2, 23, 136)
    check_attention("triton", q, k, v.requires_grad_(), is_causal=True)


@pytest.mark.parametrize("features", DROPOUT_FEATURES, ids=str)
def test_dropout_mask_is_the_same_in_forward_and_backward(features):
    """The keep-mask recovered from the forward (identity values) reproduces the output and the
    gradients through the reference: the backward regenerated the very same mask; the kept fraction
    is 1 - p. On a GPU forward and backward use other tile shapes, so the mask must not depend on tiling."""
    check_dropout_against_reference("triton", features, seq_k=56)


# Parameters are built at import: the slopes come from a generator of their own, not from the global RNG,
# whose state then depends on which test modules were imported first (an order-dependent failure). Any draw
# must pass: the slope gradient is held to the policy for every slope draw (the kernel centers distances).
_VARLEN_KWARGS = [
    {},
    {"is_causal": True},
    {"is_causal": True, "window_size": (4, -1), "softcap": 1.5},
    {"alibi_slopes": torch.rand(4, 4, generator=torch.Generator().manual_seed(0)), "scale": 0.2},
]


@pytest.mark.parametrize(
    "dtype,kwargs",
    [(dt, kw) for dt in DTYPES for i, kw in enumerate(_VARLEN_KWARGS)
     if not (dt == torch.bfloat16 and DEVICE.type == "cpu" and i % 2 == 0)],  # interpreted bfloat16: two
    ids=lambda x: str(x).removeprefix("torch.") if isinstance(x, torch.dtype) else "+".join(x) or "plain",
)
def test_varlen(dtype, kwargs):
    torch.manual_seed(0)
    kwargs = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    _check("triton", dtype, 4, 4, 16, **kwargs)


def test_varlen_overstated_max_seqlen():
    """max_seqlen far above the longest sequence (an upper bound, as FlashAttention takes it) sized the
    launch grid: programs with nothing to do, and an OverflowError past int32. Same results as exact."""
    torch.manual_seed(6)
    q, k, v = (rand(n, 4, 16, requires_grad=True) for n in (9, 11, 11))
    cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 11], dtype=torch.int32)
    results = []
    for max_q, max_k in ((5, 6), (2**40, 2**40)):
        out = fused_attention.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True, backend="triton")
        results.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    for exact, overstated in zip(*results):
        assert torch.equal(exact, overstated)


@pytest.mark.parametrize("slopes_shape", [(4,), (2, 4)], ids=str)
def test_alibi_slopes_gradient(slopes_shape):
    torch.manual_seed(12)
    q, k, v, _ = _inputs({"causal"}, torch.float32)
    slopes = (torch.rand(*slopes_shape) + 0.1).requires_grad_()
    out = fused_attention.scaled_dot_product_attention(q, k, v, is_causal=True, alibi_slopes=slopes, backend="triton")
    upstream = torch.randn(out.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, slopes, upstream.float())
    refs = {}
    for dt in (torch.float32, torch.float64):
        leaf = slopes.detach().to(dt).requires_grad_()
        ref, _ = reference_attention(*(t.detach().to(dt) for t in (q, k, v)), is_causal=True, alibi_slopes=leaf)
        refs[dt] = torch.autograd.grad(ref, leaf, upstream.to(dt))[0]
    assert_policy(grad, refs[torch.float32], refs[torch.float64], 3, "grad alibi_slopes")


def test_varlen_alibi_slopes_gradient():
    torch.manual_seed(13)
    cu = torch.tensor([0, 5, 5, 17], dtype=torch.int32)
    q, k, v = rand(17, 2, 16), rand(17, 2, 16), rand(17, 2, 16)
    slopes = (torch.rand(3, 2) + 0.1).requires_grad_()
    grads = {}
    for name in ("triton", "torch"):
        out = fused_attention.varlen_attention(q, k, v, cu, cu, 12, 12, alibi_slopes=slopes, is_causal=True,
                                               backend=name)
        grads[name] = torch.autograd.grad(out.sum(), slopes)[0]
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-5)


def test_deterministic_backward_is_bitwise_reproducible():
    """Under torch.use_deterministic_algorithms(True) every gradient, including a mask gradient summed
    over batch, heads and key blocks, comes out bit for bit the same, and still passes the policy."""
    torch.manual_seed(17)
    q, k, v, kwargs = _inputs({"gqa", "alibi"})
    mask = rand(1, 1, q.shape[2], 1, requires_grad=True)  # broadcast over batch, heads and keys
    wrt = (q, k, v, mask, kwargs["alibi_slopes"].requires_grad_())
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out = fused_attention.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="triton", **kwargs)
            runs.append(torch.autograd.grad(out.sum(), wrt))
        assert all(torch.equal(a, b) for a, b in zip(*runs))
        check_attention("triton", q, k, v, attn_mask=mask, **kwargs)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="fakes the SM count of the interpreter's device")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_dkdv_split_over_the_query_head_group(monkeypatch, deterministic):
    """With few KV heads the dK/dV pass splits each query-head group over programs (here: as if the
    device had 64 SMs) and sums their float32 partials in a fixed order: gradients, a mask's broadcast
    over heads included, pass the policy, and come out bit for bit the same twice."""
    from fused_attention.kernels.triton import attention_backward

    monkeypatch.setattr(attention_backward, "_sm_count", lambda device: 64)
    torch.manual_seed(23)
    q, k, v, kwargs = _inputs({"gqa", "alibi"})
    kwargs["attn_mask"] = rand(1, 1, q.shape[2], k.shape[2], requires_grad=True)
    problem_splits = []
    original = attention_backward.dkdv_splits
    monkeypatch.setattr(attention_backward, "dkdv_splits", lambda *a: problem_splits.append(original(*a)) or
                        problem_splits[-1])
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_attention("triton", q, k, v, **kwargs)
        wrt = (q, k, v, kwargs["attn_mask"])
        runs = [torch.autograd.grad(fused_attention.scaled_dot_product_attention(
            q, k, v, backend="triton", **kwargs).sum(), wrt) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert problem_splits and all(n == q.shape[1] // k.shape[1] > 1 for n in problem_splits)
    if deterministic:
        assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("mask_shape", [(1, 1, 37, 53), (2, 1, 1, 53)], ids=str)
def test_deterministic_broadcast_mask_gradient(mask_shape):
    """Summed in a fixed order over programs, a broadcast mask's gradient passes the policy (the atomic
    way runs in the shared test_broadcast_float_mask_gradient)."""
    deterministic = True
    torch.manual_seed(18)
    q, k, v, kwargs = _inputs({"gqa"})
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_attention("triton", q, k, v, attn_mask=rand(*mask_shape, requires_grad=True), **kwargs)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("mask_shape", [(1, 4, 37, 1), (1, 1, 1, 1)], ids=str)
def test_mask_gradient_summed_over_keys_vanishes(mask_shape, deterministic):
    """A mask constant along the keys shifts every score of a row alike, which softmax ignores: its
    gradient is exactly 0, and what a float32 sum of the row's score gradients leaves is rounding. The
    policy would compare two such noises; instead the result must be within float32 summation error:
    ``|g| <= 8 * eps * sum |dS|`` over the summed entries (dS from the float64 reference)."""
    torch.manual_seed(18)
    q, k, v, kwargs = _inputs({"gqa"})
    mask = rand(*mask_shape, requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = fused_attention.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="triton", **kwargs)
        upstream = torch.randn(out.shape, dtype=torch.float64)
        (grad,) = torch.autograd.grad(out, mask, upstream.float())
    finally:
        torch.use_deterministic_algorithms(previous)
    full = mask.detach().double().expand(2, 4, 37, 53).clone().requires_grad_()
    ref, _ = reference_attention(*(t.detach().double() for t in (q, k, v)), attn_mask=full, **kwargs)
    (ds,) = torch.autograd.grad(ref, full, upstream)
    summed = tuple(d for d, n in enumerate(mask_shape) if n == 1)
    bound = 8 * torch.finfo(torch.float32).eps * ds.abs().sum(summed, keepdim=True)
    assert (grad.double().abs() <= bound).all(), (grad.abs().max().item(), bound.min().item())


# ------------------------------------------------------------------------------- tile skipping


def _count_tiles(monkeypatch, module_name: str, helpers: tuple[str, ...] = ("scores",)) -> list[int]:
    """Counts the score tiles a kernel module computes (the interpreter runs helpers as Python)."""
    import importlib

    from fused_attention.kernels.triton import attention_configs

    # the counts below are of the interpreter's small tile, whatever size it would pick for the shape
    small = attention_configs.INTERPRETER_SMALL_TILE
    monkeypatch.setattr(attention_configs, "interpreter_tile", lambda *_: small)
    module = importlib.import_module(f"fused_attention.kernels.triton.{module_name}")
    calls = [0]

    def counting(original):
        def count(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        return count

    for helper in helpers:
        monkeypatch.setattr(module, helper, counting(getattr(module, helper)))
    return calls


@pytest.mark.skipif(DEVICE.type == "cuda", reason="counts tiles through the interpreter")
@pytest.mark.parametrize(
    "kwargs,expected",
    [
        # L = S = 128, forward tiles 16 x 32: 8 query blocks x 4 key blocks = 32 tiles when nothing hides any
        ({}, 32),
        ({"is_causal": True}, 1 + 1 + 2 + 2 + 3 + 3 + 4 + 4),  # keys up to the block's last row
        # rows [m, m + 16) see keys [m - 8, m + 16): a second key block where that range crosses a multiple of 32
        ({"window_size": (8, 0)}, 1 + 1 + 2 + 1 + 2 + 1 + 2 + 1),
        ({"key_lengths": torch.tensor([40])}, 8 * 2),
    ],
    ids=["full", "causal", "window", "key_lengths"],
)
def test_forward_skips_hidden_tiles(monkeypatch, kwargs, expected):
    # float32 takes the shared `scores` expression, 16-bit inputs the log2-unit `tile_scores`
    calls = _count_tiles(monkeypatch, "attention_forward", ("tile_scores", "scores"))
    q = rand(1, 1, 128, 16)
    fused_attention.scaled_dot_product_attention(q, q, q, backend="triton", **kwargs)
    assert calls[0] == expected


@pytest.mark.skipif(DEVICE.type == "cuda", reason="counts tiles through the interpreter")
def test_backward_skips_hidden_tiles(monkeypatch):
    calls = _count_tiles(monkeypatch, "attention_backward")
    q = rand(1, 1, 256, 16, requires_grad=True)
    counts = []
    for kwargs in ({"window_size": (8, 0)}, {}):
        calls[0] = 0
        fused_attention.scaled_dot_product_attention(q, q, q, backend="triton", **kwargs).sum().backward()
        counts.append(calls[0])
    assert 4 * counts[0] < counts[1]  # a window of 9 keys visits a small fraction of 256 x 256


# ----------------------------------------------------------------------------- dispatch, errors


def test_automatic_dispatch_never_picks_triton_for_cpu_tensors():
    q = rand(1, 2, 8, 16)
    inputs = canonicalize(q, q, q)
    assert not BACKENDS["triton"].not_supported_reasons(inputs)  # it could serve, forced (interpreter)
    assert "triton" not in fused_attention.backends.priority("cpu")


_REFUSED = [
    pytest.param(torch.float64, 16, 16, "dtype torch.float64 not supported", id="float64"),
    pytest.param(torch.float32, 20, 20, "head dim 20 is not a multiple of 8", id="head_dim"),
    pytest.param(torch.float32, 16, 12, "value head dim 12 is not a multiple of 8", id="value_head_dim"),
    pytest.param(torch.float32, 264, 264, "head dim 264 > 256", id="head_dim_too_large"),
]


@pytest.mark.parametrize("dtype,head_dim,value_head_dim,reason", _REFUSED)
def test_forced_triton_explains_what_it_cannot_serve(dtype, head_dim, value_head_dim, reason):
    q = torch.randn(1, 1, 4, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(1, 1, 4, value_head_dim, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match="backend 'triton' cannot serve") as info:
        fused_attention.scaled_dot_product_attention(q, q, v, backend="triton")
    assert reason in str(info.value)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="probes the interpreter")
def test_bfloat16_on_cpu_follows_the_interpreter_probe(monkeypatch):
    """bfloat16 on the CPU is served exactly when a bfloat16 tl.dot computes right: with conftest's shim
    it does; with the interpreter's own dot (raw 16-bit patterns) the probe fails and forcing triton
    raises with the reason."""
    from triton.runtime.interpreter import InterpreterBuilder

    from fused_attention.kernels.triton import interpreter_probe

    q = rand(1, 1, 4, 16, dtype=torch.bfloat16)
    assert interpreter_probe.interpreter_bfloat16_dot_ok()
    assert not BACKENDS["triton"].not_supported_reasons(canonicalize(q, q, q))
    unpatched = getattr(InterpreterBuilder.create_dot, "unpatched", None)
    if unpatched is None:
        pytest.skip("this Triton's interpreter needs no shim")
    monkeypatch.setattr(InterpreterBuilder, "create_dot", unpatched)
    monkeypatch.setattr(interpreter_probe, "interpreter_bfloat16_dot_ok",
                        interpreter_probe.interpreter_bfloat16_dot_ok.__wrapped__)
    assert not interpreter_probe.interpreter_bfloat16_dot_ok()
    with pytest.raises(ValueError, match="computes tl.dot on bfloat16 wrongly"):
        fused_attention.scaled_dot_product_attention(q, q, q, backend="triton")


def test_bfloat16_casts_round_to_nearest_even_as_torch_does():
    """A float32 to bfloat16 cast in a kernel (P tiles before the P V product, every stored output) rounds
    as torch and the GPU's ``cvt.rn`` do: to nearest, ties to even, NaN kept. The interpreter's own cast
    truncates (conftest's shim rounds it), which doubled the kernels' bfloat16 output error."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n).to(tl.bfloat16), mask=offsets < n)

    torch.manual_seed(14)
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-130 + 2**-140])  # halfway cases, a subnormal
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, -3.4e38, 0.0, -0.0, 1e-45])
    x = torch.cat([torch.randn(4000) * 10.0 ** torch.randint(-40, 38, (4000,)), ties, special]).to(DEVICE)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    cast[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    expected = x.to(torch.bfloat16)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.view(torch.int16)[~y.isnan()], expected.view(torch.int16)[~expected.isnan()])


def test_bfloat16_with_a_negative_scale():
    """A negative scale flips q's sign in the forward; in bfloat16 the interpreters (Triton 3.2 and 3.6)
    negated the raw 16-bit patterns as integers (-1.125 came out 3.75: outputs off by 3, lse by 68), so
    the kernel negates in float32 (exact; once per program)."""
    if not serves("triton", torch.bfloat16):
        pytest.skip("bfloat16 is not served here")
    torch.manual_seed(17)
    q, k, v = (rand(2, 2, n, 16, dtype=torch.bfloat16, requires_grad=True) for n in (19, 23, 23))
    check_attention("triton", q, k, v, scale=-0.7, is_causal=True)


# ------------------------------------------------------------------ torch.library and compile

ops = torch.ops.fused_attention


def _dense_op_args(mask: bool, dropout: bool) -> tuple:
    torch.manual_seed(0)
    q = rand(2, 4, 9, 16, requires_grad=True)
    k = rand(2, 2, 13, 16, requires_grad=True)
    v = rand(2, 2, 13, 8, requires_grad=True)
    float_mask = rand(1, 4, 9, 13, requires_grad=True) if mask else None
    slopes = (torch.rand(1, 4) + 0.1).requires_grad_()
    seed = torch.tensor([1234567], dtype=torch.int64) if dropout else None
    return (q, k, v, float_mask, torch.tensor([13, 7]), slopes, seed, False, 5, 2, 2.5, 0.25,
            0.2 if dropout else 0.0)


def _varlen_op_args(dropout: bool) -> tuple:
    torch.manual_seed(1)
    cu_q, cu_k = torch.tensor([0, 4, 4, 15], dtype=torch.int32), torch.tensor([0, 6, 9, 21], dtype=torch.int32)
    q = rand(15, 4, 16, requires_grad=True)
    k = rand(21, 2, 16, requires_grad=True)
    v = rand(21, 2, 8, requires_grad=True)
    slopes = (torch.rand(3, 4) + 0.1).requires_grad_()
    seed = torch.tensor([7654321], dtype=torch.int64) if dropout else None
    return (q, k, v, cu_q, cu_k, slopes, seed, 5, 0, 3.0, 0.25, 0.1 if dropout else 0.0, 11, 12)


@pytest.mark.parametrize("mask,dropout", [(True, False), (False, True)], ids=["mask+alibi", "dropout+alibi"])
def test_opcheck_triton_attention(mask, dropout):
    torch.library.opcheck(ops.triton_attention, _dense_op_args(mask, dropout))


@pytest.mark.parametrize("dropout", [False, True], ids=["alibi", "dropout+alibi"])
def test_opcheck_triton_varlen(dropout):
    torch.library.opcheck(ops.triton_varlen, _varlen_op_args(dropout))


def test_opcheck_backward_ops():
    args = [t.detach() if isinstance(t, torch.Tensor) else t for t in _dense_op_args(True, False)]
    out, lse = ops.triton_attention(*args)
    q, k, v, mask, lengths, slopes, seed, *options = args
    torch.library.opcheck(ops.triton_attention_backward,
                          (torch.randn_like(out), out, q, k, v, mask, lengths, slopes, seed, lse, *options, True, True))
    args = [t.detach() if isinstance(t, torch.Tensor) else t for t in _varlen_op_args(False)]
    out, lse = ops.triton_varlen(*args)
    q, k, v, cu_q, cu_k, slopes, seed, *options, max_q, max_k = args
    torch.library.opcheck(ops.triton_varlen_backward,
                          (torch.randn_like(out), out, q, k, v, cu_q, cu_k, slopes, seed, lse, max_q, max_k,
                           *options, True))


def _compiled_matches_eager(fn, leaves: dict, **kwargs):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        fresh = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
        out = f(**fresh, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        results.append((out, torch.autograd.grad(out.sum(), list(fresh.values()))))
    for a, b in zip((results[0][0], *results[0][1]), (results[1][0], *results[1][1])):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch._dynamo.reset()


def test_compile_fullgraph_sdpa():
    torch.manual_seed(19)
    q, k, v, kwargs = _inputs({"gqa", "alibi", "window", "softcap", "key_lengths"}, seq_q=20, seq_k=24)
    mask = rand(1, 1, 20, 24, requires_grad=True)
    _compiled_matches_eager(fused_attention.scaled_dot_product_attention, {"query": q, "key": k, "value": v,
                            "attn_mask": mask}, backend="triton", return_lse=True, **kwargs)


def test_compile_fullgraph_varlen():
    torch.manual_seed(20)
    cu = torch.tensor([0, 3, 11], dtype=torch.int32)
    leaves = {"q": rand(11, 4, 16), "k": rand(11, 2, 16), "v": rand(11, 2, 16)}
    _compiled_matches_eager(fused_attention.varlen_attention, leaves, cu_seqlens_q=cu, cu_seqlens_k=cu,
                            max_seqlen_q=8, max_seqlen_k=8, is_causal=True, alibi_slopes=torch.rand(4),
                            backend="triton")


# ------------------------------------------------------------------------ GPU (skipped without one)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "features", [(), ("causal",), ("gqa", "alibi", "window"), ("softcap", "key_lengths"), ("float_mask",)], ids=str
)
def test_gpu_large_shapes(dtype, features):
    """Large-ish shapes on the GPU, against the float64 reference (on the GPU too), by the policy: output
    (trained and inference), lse and the gradients of every input that requires grad."""
    torch.manual_seed(21)
    q, k, v, kwargs = _inputs(set(features), dtype, batch=2, hq=8, seq_q=1000, seq_k=1100, head_dim=128)
    check_attention("triton", q, k, v, **kwargs)  # on the GPU: this module's default device there


@gpu
def test_gpu_long_sequence_causal_bf16():
    """A long causal bf16 sequence against the float64 reference by the policy, gradients included."""
    torch.manual_seed(22)
    q, k, v = (rand(1, 2, 8192, 128, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    check_attention("triton", q, k, v, is_causal=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("features", [(), ("causal", "gqa")], ids=str)
def test_gpu_gradients_at_4096(dtype, features):
    """bf16/fp16 gradients (q, k, v) at L = S = 4096 against the float64 reference by the policy: the
    backward's delta = rowsum(dO * O), the (keys, queries) dK/dV tiles and, with GQA, the split of the
    query-head group over programs, at a size where every tile config dispatch picks is full."""
    torch.manual_seed(24)
    q, k, v, kwargs = _inputs(set(features), dtype, batch=1, hq=4, seq_q=4096, seq_k=4096, head_dim=128)
    check_attention("triton", q, k, v, **kwargs)


@gpu
def test_gpu_64_bit_offsets():
    """Keys past element 2**31 of their tensor: offsets must be computed in 64 bits."""
    seq_k = (1 << 31) // 128 + 4096
    k = torch.randn(1, 1, seq_k, 128, device="cuda", dtype=torch.float16)
    q = torch.randn(1, 1, 16, 128, device="cuda", dtype=torch.float16)
    out = fused_attention.scaled_dot_product_attention(q, k, k, window_size=(64, 0), backend="triton")
    tail = k[:, :, -80:]
    expected = fused_attention.scaled_dot_product_attention(q, tail, tail, window_size=(64, 0), backend="torch")
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)


# q, k and v with their head dim outermost in memory, each feature a stride of 2**31 / (D - 1) elements
# apart: the last feature's offset passes 2**31 (a kernel multiplying feature index by stride in 32 bits
# reads 4 GiB before the tensor). One 4.3 GB storage holds all three; on the CPU only the pages written
# are committed (about D pages each). Run in a fresh process: a wrapped offset's read crashes it.
_FEATURE_MAJOR_SCRIPT = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
from conftest import check_attention
device, seq_q, seq_k, dim = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), 32
stride = 2**31 // (dim - 1) + 1
try:
    store = torch.empty((dim - 1) * stride + seq_q + 2 * seq_k, dtype=torch.float16, device=device)
except (RuntimeError, MemoryError) as error:
    print("skip:", error)
    sys.exit(0)
torch.manual_seed(0)
torch.set_default_device(device)  # the policy's upstream gradient too
starts = (0, seq_q, seq_q + seq_k)
lengths = (seq_q, seq_k, seq_k)
q, k, v = (store.as_strided((1, 1, n, dim), (1, 1, 1, stride), start) for n, start in zip(lengths, starts))
for t in (q, k, v):
    t.copy_(torch.randn(t.shape))
    t.requires_grad_(True)
check_attention("triton", q, k, v)
print("ok")
"""


@pytest.mark.parametrize("seq_q, seq_k", [(24, 40), (3, 256)], ids=str)  # (3, 256): split-KV decode too
def test_feature_strides_past_2_31(seq_q, seq_k):
    """Head-dim-major q, k, v (feature stride x head dim > 2**31 elements): the forward (its 64-bit key
    tiles), both backward passes and, for inference with few query rows, the split-KV decode kernel index
    features in 64 bits."""
    tests = Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, "-c", _FEATURE_MAJOR_SCRIPT, str(tests), DEVICE.type, str(seq_q), str(seq_k)],
        cwd=tests.parent, env=os.environ.copy(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    if result.stdout.startswith("skip:"):
        pytest.skip(f"no room for a 4.3 GB float16 storage: {result.stdout.strip()}")
    assert result.stdout.strip().endswith("ok"), result.stdout[-2000:]
