"""fused_attention.nn attention modules against torch's own modules (and the classic tutorial class),
by DESIGN.md's tolerance policy: ``ref64`` is the reference module run in float64, ``ref_dt`` the same
module in the tested dtype."""

from __future__ import annotations

import copy
import itertools
import math
import random
import warnings
import zlib
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_policy
from torch import nn
from torch.profiler import profile

import fused_attention
import fused_attention.nn.multihead as multihead_module
from fused_attention.nn import MultiheadAttention, SelfAttention, TransformerEncoderLayer

E, H = 24, 3  # head dim 8
N, L, S = 2, 7, 9


def randomize_(module: nn.Module, gen: torch.Generator, scale: float = 0.2) -> nn.Module:
    """Fresh random parameters, biases included (torch initialises biases to zero)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return module


def reference_trio(cls_ref, cls_ours, args, kwargs, dtype, gen, ours_kwargs=None, scale=0.2):
    """(ours in dtype, the reference class in dtype, the reference class in float64), one state_dict."""
    ref64 = randomize_(cls_ref(*args, **kwargs, dtype=torch.float64), gen, scale)
    # As for kernels, the float64 oracle runs on the very values the dtype modules hold (rounded to
    # dtype), so the policy measures the computation's rounding, not the inputs'.
    state = {name: t.to(dtype).to(torch.float64) for name, t in ref64.state_dict().items()}
    ref64.load_state_dict(state)
    ref_dt = cls_ref(*args, **kwargs, dtype=dtype)
    ref_dt.load_state_dict(state)
    ours = cls_ours(*args, **kwargs, **(ours_kwargs or {}), dtype=dtype)
    ours.load_state_dict(state)
    return ours, ref_dt, ref64


def compare(run, modules, dtype, inputs64, grad=True):
    """Runs ``run(module, inputs_in_dtype)`` -> tuple of outputs on the three modules and applies the
    policy to every output, and (with ``grad``) to the gradients of every float input and parameter."""
    results = []
    for module, dt in zip(modules, (dtype, dtype, torch.float64)):
        leaves = {name: t.detach().to(dtype).to(dt).requires_grad_(grad)
                  for name, t in inputs64.items() if t.is_floating_point()}
        tensors = {name: leaves.get(name, t) for name, t in inputs64.items()}
        outs = [o for o in run(module, tensors) if o is not None]
        results.append((module, leaves, outs))
    (_, _, ours), (_, _, ref_dt), (_, _, ref64) = results
    assert len(ours) == len(ref64)
    for i, (a, b, c) in enumerate(zip(ours, ref_dt, ref64)):
        assert a.dtype == b.dtype
        assert_policy(a, b, c, 2, f"output {i}")
    if not grad:
        return
    gen = torch.Generator().manual_seed(1234)
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in ref64]
    grads = []
    for module, leaves, outs in results:
        named = list(leaves.items()) + list(module.named_parameters())
        gs = torch.autograd.grad(outs, [t for _, t in named], [u.to(o.dtype) for u, o in zip(upstream, outs)],
                                 allow_unused=True)
        grads.append({name: g for (name, _), g in zip(named, gs)})
    for name, g64 in grads[2].items():
        if g64 is None:
            continue
        assert_policy(grads[0][name], grads[1][name], g64, 3, f"grad {name}")


# --- MultiheadAttention: every combination against torch's module ---------------------------------------


@dataclass(frozen=True)
class MhaCase:
    batched: bool = True
    batch_first: bool = False
    kv: str = "self"  # self | shared (key is value) | separate
    kvdim: bool = False  # kdim/vdim differ from embed_dim (separate projection weights)
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    attn: str = "none"  # none | bool2 | float2 | bool3 | float3 | causal_bool | causal_float
    kpm: str = "none"  # none | right_bool | right_float | scattered_bool | scattered_float | unpadded
    need_weights: bool = True
    average: bool = True

    def __str__(self):
        return "-".join(f"{k}={v}" for k, v in self.__dict__.items() if v != MhaCase.__dataclass_fields__[k].default)


AXES = {
    "batched": [True, False],
    "batch_first": [False, True],
    "kv": ["self", "shared", "separate"],
    "kvdim": [False, True],
    "bias": [True, False],
    "add_bias_kv": [False, True],
    "add_zero_attn": [False, True],
    "attn": ["none", "bool2", "float2", "bool3", "float3", "causal_bool", "causal_float"],
    "kpm": ["none", "right_bool", "right_float", "scattered_bool", "scattered_float", "unpadded"],
    "need_weights": [True, False],
    "average": [True, False],
}


def _valid(case: MhaCase) -> MhaCase:
    if case.kvdim:
        case = replace(case, kv="separate")
    return case


def mha_cases() -> list[MhaCase]:
    """Every mask pairing with and without weights, plus each value of each axis with the others drawn
    at random (seeded), so every option meets many others."""
    cases = [MhaCase(attn=a, kpm=k, need_weights=w) for a, k, w in itertools.product(AXES["attn"], AXES["kpm"], (True, False))]
    rng = random.Random(6)
    for axis, values in AXES.items():
        for value in values:
            for _ in range(3):
                choice = {name: rng.choice(vals) for name, vals in AXES.items()}
                choice[axis] = value
                cases.append(MhaCase(**choice))
    unique = list(dict.fromkeys(_valid(c) for c in cases))
    return unique


def mha_inputs(case: MhaCase, gen: torch.Generator) -> dict[str, torch.Tensor]:
    causal = case.attn.startswith("causal")
    seq_k = L if causal or case.kv == "self" else S
    batch = N if case.batched else 1
    kdim, vdim = (10, 14) if case.kvdim else (E, E)

    def x(seq, dim):
        t = torch.randn(batch, seq, dim, generator=gen, dtype=torch.float64)
        if not case.batched:
            return t[0]
        return t if case.batch_first else t.transpose(0, 1).contiguous()

    inputs = {"query": x(L, E)}
    if case.kv != "self":
        inputs["key"] = x(seq_k, kdim)
        if case.kv == "separate":
            inputs["value"] = x(seq_k, vdim)
    # Key 0 is never masked, so no row is empty (torch gives NaN there; we give 0, tested apart).
    if case.attn in ("bool2", "float2", "bool3", "float3"):
        shape = (L, seq_k) if case.attn.endswith("2") else (batch * H, L, seq_k)
        ignore = torch.rand(shape, generator=gen) < 0.3
        ignore[..., 0] = False
        if case.attn.startswith("bool"):
            inputs["attn_mask"] = ignore
        else:
            bias = torch.randn(shape, generator=gen, dtype=torch.float64)
            inputs["attn_mask"] = bias.masked_fill(ignore, float("-inf"))
    elif causal:
        future = torch.ones(L, L, dtype=torch.bool).triu(1)
        inputs["attn_mask"] = future if case.attn == "causal_bool" else nn.Transformer.generate_square_subsequent_mask(
            L, dtype=torch.float64
        )
    if case.kpm != "none":
        lengths = torch.randint(2, seq_k + 1, (batch,), generator=gen)
        padded = torch.arange(seq_k) >= lengths[:, None]
        if case.kpm.startswith("scattered"):
            padded = torch.rand(batch, seq_k, generator=gen) < 0.4
            padded[:, 0], padded[:, 1], padded[:, -1] = False, True, False  # not right padding
        elif case.kpm == "unpadded":
            padded = torch.zeros(batch, seq_k, dtype=torch.bool)
        if case.kpm.endswith("float"):
            padded = torch.zeros(batch, seq_k, dtype=torch.float64).masked_fill(padded, float("-inf"))
            if case.kpm == "scattered_float":
                padded = padded + torch.randn(batch, seq_k, generator=gen, dtype=torch.float64)
        inputs["key_padding_mask"] = padded if case.batched else padded[0]
    return inputs


def run_mha(case: MhaCase):
    def run(module, t):
        query = t["query"]
        key = t.get("key", query)
        value = t.get("value", key)
        masks = {}
        for name in ("attn_mask", "key_padding_mask"):
            mask = t.get(name)
            if mask is not None and mask.is_floating_point():
                mask = mask.detach()  # masks are inputs, not leaves under test
            masks[name] = mask
        out, weights = module(
            query, key, value, need_weights=case.need_weights, average_attn_weights=case.average,
            is_causal=case.attn.startswith("causal"), **masks,
        )
        if not case.need_weights:
            assert weights is None
        return out, weights

    return run


def mha_kwargs(case: MhaCase) -> dict:
    kwargs = {"bias": case.bias, "add_bias_kv": case.add_bias_kv, "add_zero_attn": case.add_zero_attn,
              "batch_first": case.batch_first}
    if case.kvdim:
        kwargs.update(kdim=10, vdim=14)
    return kwargs


CASES = mha_cases()


def check_mha_case(case: MhaCase, dtype: torch.dtype, gen: torch.Generator, scale: float = 0.2) -> None:
    """Parameters at ``scale`` (torch's xavier init gives about 0.15 here): logits of a few units."""
    modules = reference_trio(nn.MultiheadAttention, MultiheadAttention, (E, H), mha_kwargs(case), dtype, gen, scale=scale)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Support for mismatched")
        compare(run_mha(case), modules, dtype, mha_inputs(case, gen))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_multihead_attention_matches_torch(case):
    seed = zlib.crc32(str(case).encode())
    check_mha_case(case, [torch.float32, torch.bfloat16][seed % 2], torch.Generator().manual_seed(seed))


def test_gradients_at_larger_logits():
    for seed in range(8):
        check_mha_case(MhaCase(), torch.float32, torch.Generator().manual_seed(seed), scale=0.4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_multihead_attention_other_dtypes(dtype):
    gen = torch.Generator().manual_seed(1)
    case = MhaCase(batch_first=True, attn="float2", kpm="right_bool", average=False)
    modules = reference_trio(nn.MultiheadAttention, MultiheadAttention, (E, H), mha_kwargs(case), dtype, gen)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Support for mismatched")
        compare(run_mha(case), modules, dtype, mha_inputs(case, gen))


def test_need_weights_with_training_dropout_matches_torch_draw_for_draw():
    gen = torch.Generator().manual_seed(2)
    case = MhaCase(kv="shared", attn="bool2", kpm="scattered_bool", average=False)
    modules = reference_trio(nn.MultiheadAttention, MultiheadAttention, (E, H), {"dropout": 0.3}, torch.float32, gen)
    inner = run_mha(case)

    def run(module, t):
        torch.manual_seed(11)
        return inner(module.train(), t)

    compare(run, modules, torch.float32, mha_inputs(case, gen))


def test_kernel_dropout_without_weights():
    mha = randomize_(MultiheadAttention(E, H, dropout=0.4, batch_first=True), torch.Generator().manual_seed(3))
    x = torch.randn(N, L, E)
    torch.manual_seed(5)
    a = mha(x, x, x, need_weights=False)[0]
    torch.manual_seed(5)
    b = mha(x, x, x, need_weights=False)[0]
    c = mha(x, x, x, need_weights=False)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, mha.eval()(x, x, x, need_weights=False)[0])
    assert torch.isfinite(a).all()


def test_row_that_sees_no_key_gives_zero_not_nan():
    mha = randomize_(MultiheadAttention(E, H, bias=False), torch.Generator().manual_seed(4))
    x = torch.randn(L, N, E)
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[2] = True
    out, weights = mha(x, x, x, attn_mask=mask)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.equal(weights[:, 2], torch.zeros_like(weights[:, 2]))
    out2, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(out2, out)


def test_mha_state_dict_both_ways_and_isinstance():
    gen = torch.Generator().manual_seed(5)
    for kwargs in ({}, {"kdim": 10, "vdim": 14, "add_bias_kv": True, "bias": False}):
        ref = randomize_(nn.MultiheadAttention(E, H, **kwargs), gen)
        ours = MultiheadAttention(E, H, **kwargs)
        assert isinstance(ours, nn.MultiheadAttention)
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict())
        back = nn.MultiheadAttention(E, H, **kwargs)
        back.load_state_dict(ours.state_dict())
        for (name, a), b in zip(ref.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), name
    torch.manual_seed(0)
    a = nn.MultiheadAttention(E, H)
    torch.manual_seed(0)
    b = MultiheadAttention(E, H)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = []
        real = multihead_module.scaled_dot_product_attention

        def spy(*args, **kwargs):
            self.calls.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(multihead_module, "scaled_dot_product_attention", spy)


def test_key_padding_mask_becomes_key_lengths_or_a_broadcast_mask(monkeypatch):
    spy = _Spy(monkeypatch)
    mha = MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(N, S, E)
    right = torch.tensor([[False] * 6 + [True] * 3, [False] * 9])
    mha(x, x, x, key_padding_mask=right, need_weights=False)
    assert spy.calls[-1]["attn_mask"] is None and spy.calls[-1]["key_lengths"].tolist() == [6, 9]
    as_float = torch.zeros(N, S).masked_fill(right, float("-inf"))  # what torch's encoder layer hands over
    mha(x, x, x, key_padding_mask=as_float, need_weights=False)
    assert spy.calls[-1]["attn_mask"] is None and spy.calls[-1]["key_lengths"].tolist() == [6, 9]
    mha(x, x, x, key_padding_mask=torch.zeros(N, S, dtype=torch.bool), need_weights=False)
    assert spy.calls[-1]["attn_mask"] is None and spy.calls[-1]["key_lengths"] is None
    left = right.flip(-1)
    mha(x, x, x, key_padding_mask=left, need_weights=False)
    assert spy.calls[-1]["key_lengths"] is None and spy.calls[-1]["attn_mask"].shape == (N, 1, 1, S)
    # With the causal hint the mask is not read: causal + key_lengths, no dense mask at all.
    causal = nn.Transformer.generate_square_subsequent_mask(S).bool()
    mha(x, x, x, key_padding_mask=right, attn_mask=causal, is_causal=True)
    assert spy.calls[-1]["attn_mask"] is None and spy.calls[-1]["is_causal"] is True


def test_compile_fullgraph_mha():
    gen = torch.Generator().manual_seed(7)
    mha = randomize_(MultiheadAttention(E, H, batch_first=True), gen)
    x = torch.randn(N, L, E, requires_grad=True)
    padding = torch.tensor([[False] * 5 + [True] * 2, [False] * 7])
    compiled = torch.compile(mha, fullgraph=True, backend="aot_eager")
    for need_weights in (False, True):
        out, weights = compiled(x, x, x, key_padding_mask=padding, need_weights=need_weights)
        ref_out, ref_weights = mha(x, x, x, key_padding_mask=padding, need_weights=need_weights)
        torch.testing.assert_close(out, ref_out)
        if need_weights:
            torch.testing.assert_close(weights, ref_weights)
        (gx,) = torch.autograd.grad(out.sum(), x)
        (ref_gx,) = torch.autograd.grad(ref_out.sum(), x)
        torch.testing.assert_close(gx, ref_gx)


# --- bad input: torch's errors (same class) or clearer ones ---------------------------------------------


def _bad_calls():
    x, mask_ok = torch.randn(L, N, E), torch.zeros(L, L, dtype=torch.bool)
    return {
        "wrong embed dim": lambda m: m(torch.randn(L, N, E + 1), torch.randn(L, N, E + 1), torch.randn(L, N, E + 1)),
        "4-D query": lambda m: m(x[None], x[None], x[None]),
        "key not 3-D": lambda m: m(x, x[0], x[0]),
        "2-D attn_mask of wrong shape": lambda m: m(x, x, x, attn_mask=torch.zeros(L, L + 1, dtype=torch.bool)),
        "3-D attn_mask of wrong shape": lambda m: m(x, x, x, attn_mask=torch.zeros(N, L, L, dtype=torch.bool)),
        "4-D attn_mask": lambda m: m(x, x, x, attn_mask=torch.zeros(1, 1, L, L, dtype=torch.bool)),
        "int attn_mask": lambda m: m(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64)),
        "int key_padding_mask": lambda m: m(x, x, x, key_padding_mask=torch.zeros(N, L, dtype=torch.int32)),
        "key_padding_mask of wrong shape": lambda m: m(x, x, x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool)),
        "3-D key_padding_mask": lambda m: m(x, x, x, key_padding_mask=torch.zeros(N, 1, L, dtype=torch.bool)),
        "is_causal without attn_mask": lambda m: m(x, x, x, is_causal=True),
        "key of another width": lambda m: m(x, torch.randn(L, N, E - 1), torch.randn(L, N, E - 1)),
        "key and value of other shapes": lambda m: m(x, x, torch.randn(L + 1, N, E)),
        "ok (control)": lambda m: m(x, x, x, attn_mask=mask_ok),
    }


# (the names only, drawn at import: leave the global RNG as it was, so no test's data depends on which test
# modules were imported before)
with torch.random.fork_rng(devices=[]):
    _BAD_CALL_NAMES = list(_bad_calls())


@pytest.mark.parametrize("what", _BAD_CALL_NAMES)
def test_bad_input_raises_what_torch_raises(what):
    call = _bad_calls()[what]
    ref, ours = nn.MultiheadAttention(E, H), MultiheadAttention(E, H)
    try:
        call(ref)
        torch_error = None
    except Exception as e:  # noqa: BLE001 - any class: ours must be an instance of it
        torch_error = e
    if torch_error is None:
        call(ours)
        return
    with pytest.raises(type(torch_error)) as ours_error:
        call(ours)
    assert isinstance(ours_error.value, (ValueError, TypeError)), f"{what}: {ours_error.value!r}"


def test_bad_construction():
    with pytest.raises(AssertionError, match="divisible"):
        nn.MultiheadAttention(10, 3)
    with pytest.raises(AssertionError, match=r"embed_dim \(10\) must be divisible by num_heads \(3\)") as e:
        MultiheadAttention(10, 3)
    assert isinstance(e.value, ValueError)
    with pytest.raises(ValueError, match="greater than 0"):
        MultiheadAttention(0, 2)
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by nhead \(3\)"):
        TransformerEncoderLayer(10, 3)  # torch's argument names
    with pytest.raises(ValueError, match="d_model"):
        SelfAttention(10, 3)
    with pytest.raises(ValueError, match="positional"):
        MultiheadAttention(E, H, positional="sinusoidal")
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiheadAttention(E, H, positional="rope", add_bias_kv=True)
    with pytest.raises(ValueError, match="even head dim"):
        MultiheadAttention(15, 5, positional="rope")
    with pytest.raises(ValueError, match="backend"):
        MultiheadAttention(E, H, backend="nope")


def test_mismatched_mask_types_warn_as_torch():
    x = torch.randn(L, N, E)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    attn = torch.zeros(L, L)
    for module in (nn.MultiheadAttention(E, H), MultiheadAttention(E, H)):
        with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
            module(x, x, x, key_padding_mask=kpm, attn_mask=attn)


@pytest.mark.parametrize("flag", [None, 0, 1, np.bool_(True), np.bool_(False)])
def test_need_weights_is_read_as_a_truth_value_as_torch_reads_it(flag):
    """torch's module takes any truth value for ``need_weights``; ours passed it on as the kernel's
    ``return_lse``, which raised a TypeError naming an argument the caller never passed."""
    gen = torch.Generator().manual_seed(11)
    ref = randomize_(nn.MultiheadAttention(E, H), gen)
    ours = MultiheadAttention(E, H)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(L, N, E, generator=gen)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            (want, want_weights), (got, got_weights) = (m(x, x, x, need_weights=flag) for m in (ref, ours))
        torch.testing.assert_close(got, want)
        assert (got_weights is None) == (want_weights is None)
        if want_weights is not None:
            torch.testing.assert_close(got_weights, want_weights)


def test_nested_input_runs_varlen_and_rejects_what_it_cannot_serve():
    gen = torch.Generator().manual_seed(8)
    mha = randomize_(MultiheadAttention(E, H, batch_first=True), gen).eval()
    parts = [torch.randn(n, E, generator=gen) for n in (3, 7, 1)]
    for layout in (torch.strided, torch.jagged):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The PyTorch API of nested tensors is in prototype stage")
            nested = torch.nested.nested_tensor(parts, layout=layout)
            out, weights = mha(nested, nested, nested, need_weights=False)
        assert weights is None and out.is_nested and out.layout == layout
        for part, got in zip(parts, out.unbind()):
            want = mha(part[None], part[None], part[None], need_weights=False)[0][0]
            torch.testing.assert_close(got, want)
    with pytest.raises(AssertionError, match="need_weights must be False"):
        mha(nested, nested, nested)


# --- positional schemes ---------------------------------------------------------------------------------


def _manual_attention64(mha, x, bias_fn=None, rotate=None):
    """softmax(q k^T / sqrt(d) + bias) v with the module's weights in float64, batch-first x (N, L, E)."""
    w, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
    q, k, v = (torch.nn.functional.linear(x, wi, bi).unflatten(-1, (H, E // H)).transpose(1, 2)
               for wi, bi in zip(w.chunk(3), b.chunk(3)))
    if rotate is not None:
        q, k = rotate(q), rotate(k)
    scores = q @ k.transpose(-2, -1) / math.sqrt(E // H)
    if bias_fn is not None:
        scores = scores + bias_fn(scores.shape[-2], scores.shape[-1])
    out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(-2)
    return torch.nn.functional.linear(out, mha.out_proj.weight.double(), mha.out_proj.bias.double())


def _rope64(t):
    half = t.shape[-1] // 2
    inv = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    angles = torch.arange(t.shape[-2], dtype=torch.float64)[:, None] * inv
    cos, sin = angles.cos(), angles.sin()
    a, b = t[..., :half], t[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


def _alibi64(seq_q, seq_k):
    slopes = fused_attention.alibi_slopes(H).double()
    distance = (torch.arange(seq_q)[:, None] - torch.arange(seq_k)).abs().double()
    return -slopes[:, None, None] * distance


@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_mha_positional_schemes(positional):
    gen = torch.Generator().manual_seed(9)
    mha = randomize_(MultiheadAttention(E, H, batch_first=True, positional=positional), gen)
    x = torch.randn(N, L, E, generator=gen, dtype=torch.float64)
    want = _manual_attention64(mha, x, _alibi64 if positional == "alibi" else None,
                               _rope64 if positional == "rope" else None)
    for need_weights in (False, True):
        got = mha(x.float(), x.float(), x.float(), need_weights=need_weights)[0]
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    assert set(mha.state_dict()) == set(nn.MultiheadAttention(E, H).state_dict())


# --- SelfAttention ---------------------------------------------------------------------------------------


class ClassicSelfAttention(nn.Module):
    """Multi-head self-attention as the tutorials write it."""

    def __init__(self, d_model, num_heads, dropout=0.0, bias=True, dtype=None):
        super().__init__()
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.query = nn.Linear(d_model, d_model, bias=bias, dtype=dtype)
        self.key = nn.Linear(d_model, d_model, bias=bias, dtype=dtype)
        self.value = nn.Linear(d_model, d_model, bias=bias, dtype=dtype)
        self.out = nn.Linear(d_model, d_model, bias=bias, dtype=dtype)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        batch, seq, _ = x.shape
        q = self.query(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(mask == 0, float("-inf"))
        weights = self.dropout(torch.softmax(scores, dim=-1))
        out = (weights @ v).transpose(1, 2).contiguous().view(batch, seq, self.d_model)
        return self.out(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masks", ["none", "attn", "causal", "padding", "all", "scattered_padding"])
def test_self_attention_matches_classic_class(dtype, masks):
    gen = torch.Generator().manual_seed(10 + len(masks))
    modules = reference_trio(ClassicSelfAttention, SelfAttention, (E, H), {}, dtype, gen)
    seq = 11
    attend = torch.rand(seq, seq, generator=gen) > 0.3
    attend.diagonal().fill_(True)
    padding = torch.arange(seq) >= torch.tensor([[seq], [6]])
    if masks == "scattered_padding":
        padding = torch.rand(N, seq, generator=gen) < 0.4
        padding[:, 0] = False
    use_attn, use_causal = masks in ("attn", "all"), masks in ("causal", "all")
    use_padding = masks in ("padding", "all", "scattered_padding")
    classic_mask = torch.ones(N, 1, seq, seq, dtype=torch.bool)
    if use_attn:
        classic_mask = classic_mask & attend
    if use_causal:
        classic_mask = classic_mask & torch.ones(seq, seq, dtype=torch.bool).tril()
    if use_padding:
        classic_mask = classic_mask & ~padding[:, None, None, :]

    def run(module, t):
        if isinstance(module, SelfAttention):
            return (module(t["x"], attn_mask=attend if use_attn else None, is_causal=use_causal,
                           key_padding_mask=padding if use_padding else None),)
        return (module(t["x"], classic_mask if masks != "none" else None),)

    compare(run, modules, dtype, {"x": torch.randn(N, seq, E, generator=gen, dtype=torch.float64)})


@pytest.mark.parametrize("scheme", ["rotary", "alibi"])
def test_self_attention_rotary_and_alibi(scheme):
    gen = torch.Generator().manual_seed(12)
    ours = randomize_(SelfAttention(E, H, **{scheme: True}), gen)
    classic = ClassicSelfAttention(E, H, dtype=torch.float64)
    classic.load_state_dict(ours.state_dict())
    x = torch.randn(N, L, E, generator=gen, dtype=torch.float64)
    q, k, v = (layer(x).view(N, L, H, E // H).transpose(1, 2) for layer in (classic.query, classic.key, classic.value))
    if scheme == "rotary":
        q, k = _rope64(q), _rope64(k)
    scores = q @ k.transpose(-2, -1) / math.sqrt(E // H)
    if scheme == "alibi":
        scores = scores + _alibi64(L, L)
    want = classic.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(N, L, E))
    torch.testing.assert_close(ours(x.float()).double(), want, rtol=0, atol=2e-5)


def test_self_attention_dropout_bad_input_and_compile():
    module = randomize_(SelfAttention(E, H, dropout=0.5), torch.Generator().manual_seed(13))
    x = torch.randn(N, L, E)
    train_out = module(x)
    assert not torch.allclose(train_out, module.eval()(x))
    with pytest.raises(ValueError, match="d_model=24"):
        module(torch.randn(N, L, E + 1))
    with pytest.raises(ValueError, match="key_padding_mask"):
        module(x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        module(x, attn_mask=torch.ones(L, L, dtype=torch.int64))
    with pytest.raises(ValueError, match="attn_mask of shape"):
        module(x, attn_mask=torch.ones(L + 1, L + 1, dtype=torch.bool), key_padding_mask=torch.zeros(N, L).bool())
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    padding = torch.tensor([[False] * 5 + [True] * 2, [False] * 7])
    torch.testing.assert_close(compiled(x, key_padding_mask=padding, is_causal=True),
                               module(x, key_padding_mask=padding, is_causal=True))


# --- TransformerEncoderLayer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"batch_first": True, "masks": "padding"},
        {"batch_first": False, "norm_first": True, "activation": "gelu", "masks": "causal+padding"},
        {"batch_first": True, "bias": False, "masks": "float_mask"},
        {"batch_first": True, "masks": "unbatched"},
    ],
    ids=lambda c: c["masks"],
)
def test_encoder_layer_matches_torch(config):
    config = dict(config)
    masks = config.pop("masks")
    gen = torch.Generator().manual_seed(14)
    dtype = torch.float32
    kwargs = dict(dim_feedforward=40, dropout=0.0, **config)
    modules = reference_trio(nn.TransformerEncoderLayer, TransformerEncoderLayer, (E, H), kwargs, dtype, gen)
    seq = 9
    shape = (N, seq, E) if config.get("batch_first") else (seq, N, E)
    inputs = {"src": torch.randn(*shape, generator=gen, dtype=torch.float64)}
    padding = torch.arange(seq) >= torch.tensor([[seq], [5]])

    def run(module, t):
        if masks == "padding":
            return (module(t["src"], src_key_padding_mask=padding),)
        if masks == "causal+padding":
            causal = nn.Transformer.generate_square_subsequent_mask(seq)
            return (module(t["src"], src_mask=causal, src_key_padding_mask=padding, is_causal=True),)
        if masks == "float_mask":
            return (module(t["src"], src_mask=t["mask"].detach().to(t["src"].dtype)),)
        return (module(t["src"][0]),)

    if masks == "float_mask":
        inputs["mask"] = torch.randn(seq, seq, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Support for mismatched")
        compare(run, modules, dtype, inputs)


def test_encoder_layer_state_dict_init_and_inference_fast_path():
    torch.manual_seed(15)
    ref = nn.TransformerEncoderLayer(E + 8, 4, dim_feedforward=40, batch_first=True)
    torch.manual_seed(15)
    ours = TransformerEncoderLayer(E + 8, 4, dim_feedforward=40, batch_first=True)
    assert isinstance(ours, nn.TransformerEncoderLayer) and isinstance(ours.self_attn, MultiheadAttention)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), ours.state_dict().values()))
    assert list(ref.state_dict()) == list(ours.state_dict())
    randomize_(ref, torch.Generator().manual_seed(16), scale=0.2)
    ours.load_state_dict(ref.state_dict())
    ref.eval(), ours.eval()
    x = torch.randn(3, 10, E + 8)
    padding = torch.arange(10) >= torch.tensor([[10], [4], [7]])
    with torch.no_grad():
        for mask in (None, padding):
            want = ref(x, src_key_padding_mask=mask)  # torch's fast path
            with profile() as prof:
                got = ours(x, src_key_padding_mask=mask)
            names = {e.name for e in prof.events()}
            assert any(n.startswith("fused_attention") for n in names), names
            assert "aten::_transformer_encoder_layer_fwd" not in names
            keep = ~padding[:, :, None] if mask is not None else torch.ones(1, 1, 1, dtype=torch.bool)
            torch.testing.assert_close(got * keep, want * keep, rtol=0, atol=1e-5)


def test_encoder_stack_nested_fast_path_runs_varlen():
    torch.manual_seed(17)
    layer = TransformerEncoderLayer(E + 8, 4, dim_feedforward=40, batch_first=True)
    ref_layer = nn.TransformerEncoderLayer(E + 8, 4, dim_feedforward=40, batch_first=True)
    ref_layer.load_state_dict(layer.state_dict())
    ours, ref = nn.TransformerEncoder(layer, 2).eval(), nn.TransformerEncoder(ref_layer, 2).eval()
    x = torch.randn(3, 10, E + 8)
    padding = torch.arange(10) >= torch.tensor([[10], [4], [7]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile() as prof:
            got = ours(x, src_key_padding_mask=padding)
        want = ref(x, src_key_padding_mask=padding)
    names = {e.name for e in prof.events()}
    assert any(n.startswith("fused_attention::") and "varlen" in n for n in names), names
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # padded positions are 0 in both


class _FormulaAttention(nn.Module):
    """Self-attention by the formulas, for an expected output: torch's in/out projections of ``mha``, RoPE
    (half split, base 10000, positions from 0) or ALiBi (the module's slopes) and the float64 reference."""

    def __init__(self, mha, positional: str):
        super().__init__()
        self.mha, self.positional = mha, positional

    def forward(self, x, *_args, is_causal=False, **_kwargs):
        from fused_attention.reference import reference_attention

        mha, (n, seq, e) = self.mha, x.shape
        q, k, v = (t.double().reshape(n, seq, mha.num_heads, -1).transpose(1, 2)
                   for t in F.linear(x.double(), mha.in_proj_weight.double(), mha.in_proj_bias.double()).chunk(3, -1))
        slopes = None
        if self.positional == "rope":
            d = q.shape[-1]
            inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
            angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv
            cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)

            def rotate(t):
                return t * cos + torch.cat((-t[..., d // 2:], t[..., : d // 2]), -1) * sin

            q, k = rotate(q), rotate(k)
        else:
            slopes = mha.alibi().double()
        out, _ = reference_attention(q, k, v, is_causal=is_causal, alibi_slopes=slopes)
        out = out.transpose(1, 2).reshape(n, seq, e)
        return F.linear(out, mha.out_proj.weight.double(), mha.out_proj.bias.double()).to(x.dtype), None


def _formula_layer(layer: nn.Module, positional: str) -> nn.Module:
    """A deep copy of ``layer`` whose self-attention is :class:`_FormulaAttention`."""
    import copy

    expected = copy.deepcopy(layer)
    expected.self_attn = _FormulaAttention(expected.self_attn, positional)
    return expected


@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_encoder_layer_positional_and_compile(positional):
    """The layer with RoPE / ALiBi equals the formulas (eager and compiled, output and input gradient),
    and differs from the plain layer."""
    gen = torch.Generator().manual_seed(18)
    layer = randomize_(TransformerEncoderLayer(E, H, 40, dropout=0.0, batch_first=True, positional=positional), gen, 0.2)
    x = torch.randn(N, L, E, requires_grad=True)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    out = layer(x, src_mask=causal, is_causal=True)
    expected = _formula_layer(layer, positional)(x, src_mask=causal, is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    plain = TransformerEncoderLayer(E, H, 40, dropout=0.0, batch_first=True)
    plain.load_state_dict(layer.state_dict())
    assert not torch.allclose(out, plain(x, src_mask=causal, is_causal=True))  # the scheme does something
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(x, src_mask=causal, is_causal=True)
    torch.testing.assert_close(got, out)
    (g,) = torch.autograd.grad(got.sum(), x)
    (want,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)


def test_encoder_stack_of_rope_layers():
    """Every layer of a stack rotates its own q and k from position 0: the stack equals the formulas
    applied layer by layer."""
    gen = torch.Generator().manual_seed(19)
    layer = randomize_(TransformerEncoderLayer(E, H, 40, dropout=0.0, batch_first=True, positional="rope"), gen, 0.2)
    stack = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(N, L, E)
    with torch.no_grad():
        got = stack(x)
        expected = x
        for member in stack.layers:
            expected = _formula_layer(member, "rope")(expected)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("empty", ["batch", "queries"])
def test_multihead_attention_empty_batch_or_queries(batch_first, need_weights, empty):
    """No sequences or no queries give an empty output, as torch's module does (the reshape to (..., -1)
    cannot size 0 elements)."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    ours = copy.deepcopy(ref)
    MultiheadAttention.from_torch_(ours)
    n, seq_q = (0, 3) if empty == "batch" else (2, 0)
    shape_q = (n, seq_q, 8) if batch_first else (seq_q, n, 8)
    shape_k = (n, 5, 8) if batch_first else (5, n, 8)
    q, kv = torch.randn(shape_q), torch.randn(shape_k)
    expected, expected_w = ref(q, kv, kv, need_weights=need_weights)
    out, weights = ours(q, kv, kv, need_weights=need_weights)
    assert out.shape == expected.shape
    assert (weights is None) == (expected_w is None) and (weights is None or weights.shape == expected_w.shape)


def test_from_torch_on_a_fused_module_keeps_its_state_or_refuses():
    """Converting a module that is already fused returns it unchanged when asked for what it has, and
    refuses otherwise (re-initialising it dropped its trained sinks and its positional encoding)."""
    m = MultiheadAttention(16, 4, positional="alibi", sinks=True)
    with torch.no_grad():
        m.sinks.fill_(3.0)
    assert MultiheadAttention.from_torch_(m, positional="alibi", sinks=True) is m
    assert m.alibi is not None and bool((m.sinks == 3.0).all())
    with pytest.raises(ValueError, match="already a fused MultiheadAttention"):
        MultiheadAttention.from_torch_(m)
    assert m.positional == "alibi" and bool((m.sinks == 3.0).all())
