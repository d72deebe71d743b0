"""Learned attention sinks (``sinks=``): every backend that claims them against the float64 reference
by the tolerance policy (values, lse and gradients, the sinks' own included), across the features of
the shared suite; backends that do not claim them refuse with a reason and dispatch passes them by."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import assert_policy, rand, require, require_call
from torch.nn.attention.bias import CausalBias, causal_lower_right

import fused_attention
from fused_attention.backends import BACKENDS
from fused_attention.reference import reference_attention, reference_varlen_attention

B, HQ, L, S, E = 2, 4, 37, 53, 40


def _sinks(hq=HQ, dtype=torch.float32, gen=None):
    """Sink logits around the scores' own size (N(0, 2), as gpt-oss's trained sinks), requiring grad."""
    return (2 * torch.randn(hq, dtype=torch.float64, generator=gen)).to(dtype).requires_grad_()


def _inputs(features, dtype=torch.float32, seq_q=L, seq_k=S):
    hkv = HQ // 2 if "gqa" in features else HQ
    ev = 24 if "value_head_dim" in features else E
    q = rand(B, HQ, seq_q, E, dtype=dtype, requires_grad=True)
    k = rand(B, hkv, seq_k, E, dtype=dtype, requires_grad=True)
    v = rand(B, hkv, seq_k, ev, dtype=dtype, requires_grad=True)
    kwargs: dict = {"sinks": _sinks(dtype=torch.float64 if dtype == torch.float64 else torch.float32)}
    if "gqa" in features:
        kwargs["enable_gqa"] = True
    if "causal" in features:
        kwargs["is_causal"] = True
    if "causal_lower_right" in features:
        kwargs["attn_mask"] = causal_lower_right(seq_q, seq_k)
    if "window" in features:
        kwargs["window_size"] = (7, 3)
    if "alibi" in features:
        kwargs["alibi_slopes"] = torch.rand(HQ) + 0.05
    if "softcap" in features:
        kwargs["softcap"] = 2.0
    if "key_lengths" in features:
        kwargs["key_lengths"] = torch.tensor([seq_k - 10, 0])  # the second batch entry sees no key at all
    if "bool_mask" in features:
        mask = torch.rand(B, 1, seq_q, seq_k) > 0.3
        mask[:, :, 3] = False  # a fully masked row
        kwargs["attn_mask"] = mask
    if "float_mask" in features:
        kwargs["attn_mask"] = rand(1, HQ, seq_q, seq_k, dtype=dtype, requires_grad=True)
    if "scale" in features:
        kwargs["scale"] = 0.3
    return q, k, v, kwargs


def _grad_leaves(kwargs: dict) -> list[str]:
    # (a CausalBias is a tensor subclass whose attributes torch 2.6 refuses to read: it has no gradient)
    return [n for n in ("attn_mask", "sinks", "alibi_slopes") if isinstance(kwargs.get(n), torch.Tensor)
            and not isinstance(kwargs[n], CausalBias) and kwargs[n].requires_grad]


def _as_leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


def check_sinks(backend: str, q, k, v, **kwargs) -> None:
    """Output, lse and the gradients of q, k, v, the sinks (and a float mask) by the tolerance policy."""
    out, lse = fused_attention.scaled_dot_product_attention(q, k, v, return_lse=True, backend=backend, **kwargs)
    named = dict(zip("qkv", (q, k, v))) | {n: kwargs[n] for n in _grad_leaves(kwargs)}
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = dict(zip(named, torch.autograd.grad(out, list(named.values()), upstream.to(out.dtype))))
    refs = {}
    for dt in (q.dtype, torch.float64):
        leaves = {n: _as_leaf(t, dt) for n, t in named.items()}
        ref_kwargs = kwargs | {n: leaves[n] for n in named if n not in "qkv"}
        ref_out, ref_lse = reference_attention(leaves["q"], leaves["k"], leaves["v"], **ref_kwargs)
        ref_grads = torch.autograd.grad(ref_out, list(leaves.values()), upstream.to(dt))
        refs[dt] = (ref_out, ref_lse, dict(zip(named, ref_grads)))
    (out_dt, lse_dt, g_dt), (out64, lse64, g64) = refs[q.dtype], refs[torch.float64]
    assert_policy(out, out_dt, out64, 2, "output")
    assert_policy(lse, lse_dt, lse64, 2, "lse")
    for name in named:
        assert torch.isfinite(grads[name]).all(), f"grad {name} is not finite"
        assert_policy(grads[name], g_dt[name], g64[name], 3, f"grad {name}")


def _serves_sinks(backend: str) -> bool:
    return "sinks" in BACKENDS[backend].capabilities.features


@pytest.fixture
def sinks_backend(backend):
    """A backend that claims sinks (every backend that runs here either claims them or refuses them:
    see test_backends_without_sinks_refuse_them_and_dispatch_passes_them_by)."""
    if not _serves_sinks(backend):
        pytest.skip(f"{backend} does not claim sinks (tested to refuse them)")
    return backend


def test_backends_without_sinks_refuse_them_and_dispatch_passes_them_by(backend):
    q, k, v, kwargs = _inputs(set())
    if _serves_sinks(backend):
        fused_attention.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
        return
    with pytest.raises(ValueError, match="sinks"):
        fused_attention.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
    out = fused_attention.scaled_dot_product_attention(q, k, v, **kwargs)  # automatic: another backend
    ref, _ = reference_attention(*(t.detach().double() for t in (q, k, v)), sinks=kwargs["sinks"].detach())
    assert (out.double() - ref).abs().max() < 1e-5


FEATURES = [
    "causal", "causal_lower_right", "window", "alibi", "softcap", "key_lengths", "bool_mask", "float_mask",
    "gqa", "value_head_dim", "scale",
]
_MASKS = {"causal", "causal_lower_right", "bool_mask", "float_mask"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("feature", ["plain", *FEATURES])
def test_sinks_with_each_feature(sinks_backend, feature, dtype):
    torch.manual_seed(0)
    q, k, v, kwargs = _inputs({feature}, dtype)
    check_sinks(sinks_backend, q, k, v, **kwargs)


PAIRS = [p for p in itertools.combinations(FEATURES, 2) if len(_MASKS & set(p)) < 2]


@pytest.mark.parametrize("features", PAIRS, ids="+".join)
def test_sinks_with_feature_pairs(sinks_backend, features):
    torch.manual_seed(1)
    q, k, v, kwargs = _inputs(set(features))
    check_sinks(sinks_backend, q, k, v, **kwargs)


@pytest.mark.parametrize("seq_q,seq_k", [(1, 97), (97, 1), (1, 1), (64, 1025)])
def test_sinks_odd_lengths(sinks_backend, seq_q, seq_k):
    torch.manual_seed(2)
    q, k, v, kwargs = _inputs({"gqa", "causal_lower_right"}, seq_q=seq_q, seq_k=seq_k)
    check_sinks(sinks_backend, q, k, v, **kwargs)


def test_alibi_gradient_with_sinks(sinks_backend):
    torch.manual_seed(3)
    q, k, v, kwargs = _inputs({"alibi", "causal"})
    kwargs["alibi_slopes"].requires_grad_()
    check_sinks(sinks_backend, q, k, v, **kwargs)


def test_minus_inf_sinks_equal_no_sinks(sinks_backend):
    torch.manual_seed(4)
    q, k, v, kwargs = _inputs({"gqa", "window", "alibi", "key_lengths"})
    off = torch.full((HQ,), float("-inf"), requires_grad=True)
    kwargs.pop("sinks")
    results = []
    for sinks in (off, None):
        out, lse = fused_attention.scaled_dot_product_attention(
            q, k, v, return_lse=True, backend=sinks_backend, sinks=sinks, **kwargs
        )
        upstream = torch.ones_like(out)
        results.append((out, lse, torch.autograd.grad(out, (q, k, v), upstream)))
    (out, lse, grads), (out0, lse0, grads0) = results
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    for g, g0 in zip(grads, grads0):
        assert torch.equal(g, g0)
    out = fused_attention.scaled_dot_product_attention(q, k, v, backend=sinks_backend, sinks=off, **kwargs)
    (dsinks,) = torch.autograd.grad(out.sum(), off)
    assert torch.equal(dsinks, torch.zeros(HQ))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_sinks_drive_the_output_to_zero_without_nan(sinks_backend, dtype):
    torch.manual_seed(5)
    q, k, v, _ = _inputs({"causal"}, dtype)
    big = torch.full((HQ,), 1e4, requires_grad=True)
    out, lse = fused_attention.scaled_dot_product_attention(
        q, k, v, return_lse=True, backend=sinks_backend, is_causal=True, sinks=big
    )
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, 1e4))
    grads = torch.autograd.grad(out, (q, k, v, big), torch.randn_like(out))
    for g in grads:
        assert torch.isfinite(g).all()
        assert g.abs().max() == 0


def test_scores_and_sinks_of_large_magnitude(sinks_backend):
    """Scores near 300 (a float mask: +300 on five keys, -1e4 elsewhere) with sinks of that size: lse near
    302, past the triton backward's threshold for renormalizing a row's P by its sum of exp(S - lse),
    which has to count the sink (without it: gradient errors of 0.5)."""
    torch.manual_seed(15)
    q, k, v, _ = _inputs(set())
    mask = torch.full((1, 1, L, S), -1e4)
    mask[..., :5] = 300.0
    mask.requires_grad_()
    sinks = torch.tensor([301.0, -5.0, 299.0, 303.0], requires_grad=True)
    check_sinks(sinks_backend, q, k, v, attn_mask=mask, sinks=sinks)


def test_rows_without_keys_output_zero_and_lse_is_the_sink(sinks_backend):
    torch.manual_seed(6)
    q, k, v, kwargs = _inputs({"key_lengths"})
    out, lse = fused_attention.scaled_dot_product_attention(
        q, k, v, return_lse=True, backend=sinks_backend, **kwargs
    )
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(lse[1], kwargs["sinks"].detach()[:, None].expand(HQ, L))


def test_gradcheck_float64(sinks_backend):
    require(sinks_backend, torch.float64)
    torch.manual_seed(7)
    q, k, v = (rand(2, 4, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = rand(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    sinks = _sinks(dtype=torch.float64)
    slopes = torch.rand(4) + 0.1

    def f(q, k, v, mask, sinks):
        return fused_attention.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, sinks=sinks, alibi_slopes=slopes, softcap=3.0, window_size=(3, 1),
            backend=sinks_backend,
        )

    assert torch.autograd.gradcheck(f, (q, k, v, mask, sinks))


def test_gradcheck_float64_dropout_and_gqa(sinks_backend):
    require(sinks_backend, torch.float64)
    torch.manual_seed(8)
    q = rand(1, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    k, v = (rand(1, 2, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sinks = _sinks(dtype=torch.float64)

    def f(q, k, v, sinks):
        torch.manual_seed(123)
        return fused_attention.scaled_dot_product_attention(
            q, k, v, dropout_p=0.3, is_causal=True, enable_gqa=True, sinks=sinks, backend=sinks_backend
        )

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_dropout_matches_reference_with_the_same_mask(sinks_backend):
    check_dropout(sinks_backend, S)


def check_dropout(backend: str, seq_k: int) -> None:
    """The keep-mask recovered by attending to identity values (the sink has no value, so output row i
    is the row's dropped probabilities), then output and gradients with that mask."""
    torch.manual_seed(9)
    q, k, v, kwargs = _inputs({"gqa", "window"}, seq_k=seq_k)
    v = rand(B, HQ // 2, seq_k, seq_k, requires_grad=True)
    p = 0.25
    require_call(backend, q, k, v, dropout_p=p, **kwargs)  # triton: value head dims are multiples of 8
    eye = torch.eye(seq_k).expand(B, HQ // 2, seq_k, seq_k)
    torch.manual_seed(77)
    keep = fused_attention.scaled_dot_product_attention(
        q.detach(), k.detach(), eye, dropout_p=p, backend=backend, **kwargs
    ) != 0
    torch.manual_seed(77)
    out = fused_attention.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend, **kwargs)
    named = {"q": q, "k": k, "v": v, "sinks": kwargs["sinks"]}
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, list(named.values()), upstream.float())
    refs = {}
    for dt in (torch.float32, torch.float64):
        leaves = {n: _as_leaf(t, dt) for n, t in named.items()}
        ref, _ = reference_attention(
            leaves["q"], leaves["k"], leaves["v"], dropout_p=p, dropout_mask=keep,
            **(kwargs | {"sinks": leaves["sinks"]}),
        )
        refs[dt] = (ref, torch.autograd.grad(ref, list(leaves.values()), upstream.to(dt)))
    assert_policy(out, refs[torch.float32][0], refs[torch.float64][0], 2, "dropout output")
    for name, g, g_dt, g64 in zip(named, grads, refs[torch.float32][1], refs[torch.float64][1]):
        assert_policy(g, g_dt, g64, 3, f"dropout grad {name}")


CU_Q, CU_K = [0, 4, 4, 15, 15], [0, 6, 9, 21, 21]  # an empty query sequence; a sequence with no keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("options", [{}, {"is_causal": True}, {"window_size": (3, 0), "softcap": 3.0},
                                     {"alibi": True, "is_causal": True}], ids=str)
def test_varlen_sinks(sinks_backend, options, dtype):
    torch.manual_seed(10)
    q = rand(CU_Q[-1] + 2, HQ, 16, dtype=dtype, requires_grad=True)  # + rows of a last, keyless sequence
    cu_q = torch.tensor([*CU_Q[:-1], CU_Q[-1] + 2], dtype=torch.int32)
    k, v = (rand(CU_K[-1], HQ // 2, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    cu_k = torch.tensor(CU_K, dtype=torch.int32)
    sinks = _sinks()
    options = dict(options)
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.rand(HQ) + 0.1
    out, lse = fused_attention.varlen_attention(
        q, k, v, cu_q, cu_k, 11, 12, sinks=sinks, return_lse=True, backend=sinks_backend, **options
    )
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v, sinks), upstream.to(dtype))
    refs = {}
    for dt in (dtype, torch.float64):
        leaves = [_as_leaf(t, dt) for t in (q, k, v, sinks)]
        ref, ref_lse = reference_varlen_attention(*leaves[:3], cu_q, cu_k, sinks=leaves[3], **options)
        refs[dt] = (ref, ref_lse, torch.autograd.grad(ref, leaves, upstream.to(dt)))
    assert_policy(out, refs[dtype][0], refs[torch.float64][0], 2, "varlen output")
    assert_policy(lse, refs[dtype][1], refs[torch.float64][1], 2, "varlen lse")
    for name, g, g_dt, g64 in zip(("q", "k", "v", "sinks"), grads, refs[dtype][2], refs[torch.float64][2]):
        assert_policy(g, g_dt, g64, 3, f"varlen grad {name}")


def test_split_keys_merge_with_the_sink_counted_once(sinks_backend):
    """The documented lse: attention over keys split in two halves, computed without the sink, merges
    with the sink added once into the unsplit result."""
    require(sinks_backend, torch.float64)
    torch.manual_seed(11)
    q, k, v = (rand(1, HQ, 9, 16, dtype=torch.float64) for _ in range(3))
    sinks = _sinks(dtype=torch.float64).detach()
    full, full_lse = fused_attention.scaled_dot_product_attention(
        q, k, v, sinks=sinks, return_lse=True, backend=sinks_backend
    )
    parts = [
        fused_attention.scaled_dot_product_attention(
            q, k[:, :, half], v[:, :, half], return_lse=True, backend=sinks_backend
        )
        for half in (slice(0, 4), slice(4, 9))
    ]
    lses = torch.stack([lse for _, lse in parts] + [sinks[:, None].expand(HQ, 9)[None]])
    merged_lse = torch.logsumexp(lses, dim=0)
    merged = sum(o * (lse - merged_lse).exp()[..., None] for o, lse in parts)
    assert (merged - full).abs().max() < 1e-12
    assert (merged_lse - full_lse).abs().max() < 1e-12


@pytest.mark.parametrize(
    "sinks,error,match",
    [
        ([0.0] * HQ, TypeError, "sinks must be a torch.Tensor"),
        (torch.zeros(HQ, dtype=torch.float16), TypeError, "sinks must be float32"),
        (torch.zeros(HQ, dtype=torch.int64), TypeError, "sinks must be float32"),
        (torch.zeros(HQ // 2), ValueError, r"sinks must have shape \(4,\)"),
        (torch.zeros(1, HQ), ValueError, r"sinks must have shape \(4,\)"),
        (torch.tensor([0.0, float("nan"), 0.0, 0.0]), ValueError, "sinks must not be NaN"),
        (torch.tensor([0.0, float("inf"), 0.0, 0.0]), ValueError, "sinks must not be NaN or \\+inf"),
        (torch.zeros(HQ, device="meta"), ValueError, "sinks must be on cpu"),
    ],
)
def test_bad_sinks_raise_naming_the_argument(sinks, error, match):
    q = torch.randn(1, HQ, 5, 8)
    with pytest.raises(error, match=match):
        fused_attention.scaled_dot_product_attention(q, q, q, sinks=sinks)
    with pytest.raises(error, match=match):
        packed = q[0].transpose(0, 1)
        cu = torch.tensor([0, 5], dtype=torch.int32)
        fused_attention.varlen_attention(packed, packed, packed, cu, cu, 5, 5, sinks=sinks)


def test_inputs_not_mutated(sinks_backend):
    q, k, v, kwargs = _inputs({"causal"})
    before = kwargs["sinks"].detach().clone()
    out = fused_attention.scaled_dot_product_attention(q, k, v, backend=sinks_backend, **kwargs)
    out.sum().backward()
    assert torch.equal(kwargs["sinks"].detach(), before)


def test_compile_fullgraph_with_sinks():
    torch._dynamo.reset()
    q, k, v, kwargs = _inputs({"gqa", "window"})

    def f(q, k, v, sinks):
        return fused_attention.scaled_dot_product_attention(q, k, v, enable_gqa=True, window_size=(7, 3), sinks=sinks)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, kwargs["sinks"])
    ref = f(q, k, v, kwargs["sinks"])
    assert torch.equal(out, ref)
    g = torch.autograd.grad(out.sum(), kwargs["sinks"])[0]
    g_ref = torch.autograd.grad(ref.sum(), kwargs["sinks"])[0]
    assert torch.equal(g, g_ref)
    torch._dynamo.reset()


def test_opcheck_torch_ops_with_sinks():
    ops = torch.ops.fused_attention
    gen = torch.Generator().manual_seed(12)
    q = rand(2, 4, 5, 8, gen=gen, requires_grad=True)
    k, v = (rand(2, 2, 7, 8, gen=gen, requires_grad=True) for _ in range(2))
    sinks = _sinks(gen=gen)
    seed = torch.tensor([99], dtype=torch.int64)
    args = (q, k, v, None, torch.tensor([7, 3]), None, seed, sinks, True, -1, -1, 0.0, 0.35, 0.2)
    torch.library.opcheck(ops.torch_attention, args)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    out, _ = ops.torch_attention(*detached)
    torch.library.opcheck(ops.torch_attention_backward, (torch.randn_like(out), *detached, False, False, True))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed = (q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1))
    varlen_args = (*packed, cu, cu_k, None, None, sinks, 2, 0, 0.0, 0.35, 0.0)
    torch.library.opcheck(ops.torch_varlen, varlen_args)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in varlen_args]
    out, _ = ops.torch_varlen(*detached)
    torch.library.opcheck(ops.torch_varlen_backward, (torch.randn_like(out), *detached, False, True))


def test_every_cpu_instruction_set_variant_serves_sinks():
    """The best variant runs this whole file (the ``cpu`` parameter of every test above); each other one
    runs a slice of it in its own process (the variable is read once per process)."""
    import subprocess
    import sys
    from pathlib import Path

    if BACKENDS["cpu"].unavailable_reason() is not None or not _serves_sinks("cpu"):
        pytest.skip("the cpu backend is not built or does not claim sinks")
    from test_cpu_attention import _other_isas, _variant_env

    root = Path(__file__).resolve().parents[1]
    selection = "cpu and (each_feature and float32 or odd_lengths or minus_inf or large or varlen or dropout)"
    for isa in _other_isas():  # (FA_TESTS_CPU_ISA: conftest drops FUSED_ATTENTION_* variables)
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sinks.py", "-k", selection],
            cwd=root, env=_variant_env(isa), capture_output=True, text=True, timeout=900, check=False,
        )
        assert result.returncode == 0, isa + ": " + result.stdout[-3000:] + result.stderr[-2000:]
        assert " passed" in result.stdout


# --- triton: under the interpreter on the CPU (float32, float16), compiled on a GPU ---------------------

TRITON_CASES = [
    ("plain",), ("causal", "gqa"), ("window", "alibi", "softcap"), ("key_lengths", "bool_mask"), ("float_mask",),
    ("causal_lower_right", "value_head_dim"),
]


def _triton_or_skip():
    pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reasons = BACKENDS["triton"].serves_device_reason(device) or BACKENDS["triton"].unavailable_reason()
    if device.type == "cpu" and reasons:
        pytest.skip(f"triton cannot run here: {reasons}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("features", TRITON_CASES, ids="+".join)
def test_triton_sinks(features, dtype):
    _triton_or_skip()
    torch.manual_seed(13)
    q, k, v, kwargs = _inputs(set(features), dtype)
    check_sinks("triton", q, k, v, **kwargs)


def test_triton_sinks_dropout():
    _triton_or_skip()
    check_dropout("triton", 48)  # identity values: the key length is the value head dim (a multiple of 8)


@pytest.mark.parametrize("value", [float("-inf"), 1e4], ids=["minus_inf", "large"])
def test_triton_extreme_sinks(value):
    _triton_or_skip()
    torch.manual_seed(14)
    q, k, v, _ = _inputs({"causal"})
    sinks = torch.full((HQ,), value, requires_grad=True)
    out = fused_attention.scaled_dot_product_attention(q, k, v, is_causal=True, sinks=sinks, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v, sinks), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    if value > 0:
        assert torch.equal(out, torch.zeros_like(out)) and all(g.abs().max() == 0 for g in grads)
    else:
        plain = fused_attention.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
        assert torch.equal(out, plain)
        assert torch.equal(grads[3], torch.zeros(HQ))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_varlen_sinks(dtype):
    _triton_or_skip()
    test_varlen_sinks("triton", {"window_size": (3, 0), "alibi": True}, dtype)


def test_opcheck_triton_ops_with_sinks():
    _triton_or_skip()
    from fused_attention.ops import triton_attention  # noqa: F401  (registers the triton ops)

    ops = torch.ops.fused_attention
    gen = torch.Generator().manual_seed(15)
    q = rand(2, 4, 5, 16, gen=gen, requires_grad=True)
    k, v = (rand(2, 2, 7, 16, gen=gen, requires_grad=True) for _ in range(2))
    sinks = _sinks(gen=gen)
    args = (q, k, v, None, torch.tensor([7, 3]), None, None, True, -1, -1, 0.0, 0.35, 0.0, sinks)
    torch.library.opcheck(ops.triton_attention, args)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    out, lse = ops.triton_attention(*detached)
    q_, k_, v_, mask, lengths, alibi, seed, *options, sinks_ = detached
    torch.library.opcheck(
        ops.triton_attention_backward,
        (torch.randn_like(out), out, q_, k_, v_, mask, lengths, alibi, seed, lse, *options, False, False, sinks_, True),
    )


def test_sinks_and_key_lengths_given_as_strided_views(sinks_backend):
    """Vectors that are views with a stride (every other element of a larger tensor) read as their
    values: the triton kernels indexed them as if contiguous (wrong keys masked, other heads' sinks)."""
    torch.manual_seed(4)
    q, k, v, kwargs = _inputs({"key_lengths"})
    kwargs["key_lengths"] = torch.stack([kwargs["key_lengths"], torch.full((B,), S)], 1).flatten()[::2]
    kwargs["sinks"] = torch.stack([kwargs["sinks"], torch.zeros_like(kwargs["sinks"])], 1).flatten()[::2]
    assert kwargs["key_lengths"].stride() == (2,) and kwargs["sinks"].stride() == (2,)
    check_sinks(sinks_backend, q, k, v, **kwargs)
