"""The attention custom ops under torch.library.opcheck, torch.compile and torch.export.

Compile tests use ``backend="aot_eager"`` (traces through Dynamo and AOTAutograd, runs eagerly: fast);
one test, marked ``inductor``, compiles with Inductor. Under compile the torch backend does not hand
calls to torch's own SDPA, so the custom ops are what gets traced.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_attention
from fused_attention.check import alibi_slopes

ops = torch.ops.fused_attention
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rand(*shape, dtype=torch.float32, requires_grad=False, gen=None) -> torch.Tensor:
    t = torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)
    return t.requires_grad_(requires_grad)


def _seed() -> torch.Tensor:
    return torch.tensor([1234567], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------
# opcheck: schema, fake tensor, autograd registration and AOT dispatch of every custom op
# ---------------------------------------------------------------------------------------------------

B, HQ, HKV, L, S, D, DV = 2, 4, 2, 9, 13, 16, 8


def _args(op, values: dict) -> tuple:
    """``op``'s positional arguments from ``values`` by schema name, so tests follow schema changes."""
    return tuple(values[a.name] for a in op.default._schema.arguments)


def _detached(values: dict) -> dict:
    return {n: t.detach() if isinstance(t, torch.Tensor) else t for n, t in values.items()}


def _bhsd(b, h, s, d, gen, transposed=False):
    """A (B, H, S, D) leaf; transposed: the usual view of a (B, S, H, D) projection (dense, not contiguous)."""
    t = rand(b, s, h, d, gen=gen).transpose(1, 2) if transposed else rand(b, h, s, d, gen=gen)
    return t.requires_grad_()


def _dense_values(
    mask: bool, alibi: bool, dropout: bool, causal: bool, window: tuple[int, int], transposed: bool = False
) -> dict:
    """Arguments of ``torch_attention`` by name: GQA, a broadcast float mask, alibi, key_lengths."""
    gen = torch.Generator().manual_seed(0)
    return {
        "q": _bhsd(B, HQ, L, D, gen, transposed),
        "k": _bhsd(B, HKV, S, D, gen, transposed),
        "v": _bhsd(B, HKV, S, DV, gen, transposed),
        "mask": (_bhsd(1, HQ, S, L, gen).transpose(-1, -2) if transposed else _bhsd(1, HQ, L, S, gen)) if mask else None,
        "key_lengths": torch.tensor([S, 7], dtype=torch.int32),
        "alibi": alibi_slopes(HQ).unsqueeze(0).requires_grad_(True) if alibi else None,
        "seed": _seed() if dropout else None,
        "sinks": None,  # the torch ops' sink logits (tests/test_sinks.py opchecks them)
        "causal": causal,
        "window_left": window[0],
        "window_right": window[1],
        "softcap": 2.5,
        "scale": D**-0.5,
        "dropout_p": 0.2 if dropout else 0.0,
    }


# (mask, alibi, dropout, causal, window)
DENSE_CONFIGS = {
    "mask+alibi+dropout+gqa": (True, True, True, False, (-1, -1)),
    "causal+window+alibi": (False, True, False, True, (4, 2)),
    "transposed_qkv_and_mask": (True, True, False, False, (-1, -1), True),
    "mask+dropout+window": (True, False, True, False, (-1, 3)),
}


_EXTENSION = fused_attention._extension.load_extension()
_needs_extension = pytest.mark.skipif(not _EXTENSION.loaded, reason=_EXTENSION.reason)
# Op pairs with the canonical signatures (fused_attention/ops/attention_rules.py): the torch backend's
# Python ops and the compiled extension's (C++ on CPU tensors).
DENSE_OPS = [
    pytest.param(("torch_attention", "torch_attention_backward"), id="torch"),
    pytest.param(("attention", "attention_backward"), id="extension", marks=_needs_extension),
]
VARLEN_OPS = [
    pytest.param(("torch_varlen", "torch_varlen_backward"), id="torch"),
    pytest.param(("varlen_attention", "varlen_attention_backward"), id="extension", marks=_needs_extension),
]


@pytest.mark.parametrize("names", DENSE_OPS)
@pytest.mark.parametrize("config", list(DENSE_CONFIGS), ids=str)
def test_opcheck_attention(config, names):
    op = getattr(ops, names[0])
    torch.library.opcheck(op, _args(op, _dense_values(*DENSE_CONFIGS[config])))


# Whether the backward is asked for the mask / alibi gradients: when not, each such output is its own
# empty tensor (outputs may not alias one another).
EXTRA_GRADS = [pytest.param(True, id="extra_grads"), pytest.param(False, id="no_extra_grads")]


@pytest.mark.parametrize("extra_grads", EXTRA_GRADS)
@pytest.mark.parametrize("names", DENSE_OPS)
@pytest.mark.parametrize("config", list(DENSE_CONFIGS), ids=str)
def test_opcheck_attention_backward(config, names, extra_grads):
    op, backward = (getattr(ops, n) for n in names)
    values = _detached(_dense_values(*DENSE_CONFIGS[config]))
    with torch.no_grad():
        out, lse = op(*_args(op, values))
    values |= {
        "dout": torch.randn_like(out),
        "out": out,
        "lse": lse,
        "need_mask_grad": extra_grads and values["mask"] is not None,
        "need_alibi_grad": extra_grads and values["alibi"] is not None,
        "need_sinks_grad": False,
    }
    torch.library.opcheck(backward, _args(backward, values))


# Ring attention's pair (no dropout, no sinks, no autograd: its ring has its own backward).
STATS_OPS = [
    pytest.param(("torch_attention_precise_lse", "torch_attention_backward_from_stats"), id="torch"),
    pytest.param(("attention_precise_lse", "attention_backward_from_stats"), id="extension", marks=_needs_extension),
]


@pytest.mark.parametrize("names", STATS_OPS)
@pytest.mark.parametrize("config", ["causal+window+alibi", "transposed_qkv_and_mask"], ids=str)
def test_opcheck_attention_precise_lse(config, names):
    op = getattr(ops, names[0])
    values = _detached(_dense_values(*DENSE_CONFIGS[config]))
    torch.library.opcheck(op, _args(op, values))
    out, lse = op(*_args(op, values))
    assert lse.dtype == torch.float64 and out.shape == (B, HQ, L, DV)


@pytest.mark.parametrize("names", STATS_OPS)
@pytest.mark.parametrize("config", ["causal+window+alibi", "transposed_qkv_and_mask"], ids=str)
def test_opcheck_attention_backward_from_stats(config, names):
    forward, backward = (getattr(ops, n) for n in names)
    values = _detached(_dense_values(*DENSE_CONFIGS[config]))
    out, lse = forward(*_args(forward, values))
    values |= {"dout": torch.randn_like(out), "lse": lse, "delta": (out * out).sum(-1).to(lse.dtype)}
    torch.library.opcheck(backward, _args(backward, values))


CU_Q, CU_K = [0, 4, 4, 15], [0, 6, 9, 21]  # an empty query sequence, keys longer than queries


def _varlen_values(alibi_batched: bool, dropout: bool) -> dict:
    """Arguments of ``torch_varlen`` by name: three packed sequences, GQA, alibi, a window."""
    gen = torch.Generator().manual_seed(1)
    slopes = alibi_slopes(HQ).unsqueeze(0)
    if alibi_batched:
        slopes = slopes * torch.tensor([[1.0], [0.5], [0.25]])
    return {
        "q": rand(CU_Q[-1], HQ, D, requires_grad=True, gen=gen),
        "k": rand(CU_K[-1], HKV, D, requires_grad=True, gen=gen),
        "v": rand(CU_K[-1], HKV, DV, requires_grad=True, gen=gen),
        "cu_seqlens_q": torch.tensor(CU_Q, dtype=torch.int32),
        "cu_seqlens_k": torch.tensor(CU_K, dtype=torch.int32),
        "alibi": slopes.requires_grad_(True),
        "seed": _seed() if dropout else None,
        "sinks": None,
        "window_left": 5,
        "window_right": 0,
        "softcap": 3.0,
        "scale": D**-0.5,
        "dropout_p": 0.1 if dropout else 0.0,
    }


# (alibi_batched, dropout)
VARLEN_CONFIGS = {"alibi+dropout": (False, True), "batched_alibi": (True, False)}


@pytest.mark.parametrize("names", VARLEN_OPS)
@pytest.mark.parametrize("config", list(VARLEN_CONFIGS), ids=str)
def test_opcheck_varlen(config, names):
    op = getattr(ops, names[0])
    torch.library.opcheck(op, _args(op, _varlen_values(*VARLEN_CONFIGS[config])))


@pytest.mark.parametrize("extra_grads", EXTRA_GRADS)
@pytest.mark.parametrize("names", VARLEN_OPS)
@pytest.mark.parametrize("config", list(VARLEN_CONFIGS), ids=str)
def test_opcheck_varlen_backward(config, names, extra_grads):
    op, backward = (getattr(ops, n) for n in names)
    values = _detached(_varlen_values(*VARLEN_CONFIGS[config]))
    with torch.no_grad():
        out, lse = op(*_args(op, values))
    values |= {
        "dout": torch.randn_like(out),
        "out": out,
        "lse": lse,
        "need_alibi_grad": extra_grads,
        "need_sinks_grad": False,
    }
    torch.library.opcheck(backward, _args(backward, values))


# ---------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of the public functions: same outputs and gradients as eager
# ---------------------------------------------------------------------------------------------------


def _sdpa_case(name: str):
    """(tensors that require grad, other tensors, keyword options) for one feature set."""
    gen = torch.Generator().manual_seed(2)
    q = rand(B, HQ, L, D, requires_grad=True, gen=gen)
    k = rand(B, HKV, S, D, requires_grad=True, gen=gen)
    v = rand(B, HKV, S, DV, requires_grad=True, gen=gen)
    grads = {"query": q, "key": k, "value": v}
    others: dict = {}
    options: dict = {"enable_gqa": True}
    if name == "causal+alibi+window+softcap+key_lengths":
        others = {"alibi_slopes": alibi_slopes(HQ), "key_lengths": torch.tensor([S, 5], dtype=torch.int64)}
        options |= {"is_causal": True, "window_size": (6, -1), "softcap": 4.0}
    elif name == "float_mask_grad":
        grads["attn_mask"] = rand(B, 1, L, S, requires_grad=True, gen=gen)
    elif name == "return_lse":
        options |= {"return_lse": True, "window_size": (3, 3)}
    elif name == "dropout":
        options |= {"dropout_p": 0.3}
    return grads, others, options


def _as_tuple(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def _fresh(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone().requires_grad_(True) for n, t in tensors.items()}


def _compare_with_eager(
    fn, grads: dict[str, torch.Tensor], others: dict, options: dict, backend: str, seed=None
):
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    results = []
    for f in (fn, compiled):
        leaves = _fresh(grads)
        if seed is not None:
            torch.manual_seed(seed)
        outputs = _as_tuple(f(**leaves, **others, **options))
        upstream = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(3))
        results.append((outputs, torch.autograd.grad(outputs[0], list(leaves.values()), upstream)))
    (eager_out, eager_grads), (compiled_out, compiled_grads) = results
    assert len(eager_out) == len(compiled_out)
    for a, b in zip(eager_out + eager_grads, compiled_out + compiled_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    return compiled


SDPA_FEATURES = ["plain", "causal+alibi+window+softcap+key_lengths", "float_mask_grad", "return_lse"]


@pytest.mark.parametrize("name", SDPA_FEATURES, ids=str)
def test_compile_sdpa_aot_eager(name):
    grads, others, options = _sdpa_case(name)
    _compare_with_eager(fused_attention.scaled_dot_product_attention, grads, others, options, "aot_eager")


def test_compile_sdpa_dropout_matches_eager_under_the_same_seed():
    grads, others, options = _sdpa_case("dropout")
    _compare_with_eager(
        fused_attention.scaled_dot_product_attention, grads, others, options, "aot_eager", seed=7
    )


def test_compile_sdpa_traces_the_custom_op():
    """The compiled graph holds the custom op (not torch's SDPA, which would have no extension features)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    grads, others, options = _sdpa_case("plain")
    compiled = torch.compile(fused_attention.scaled_dot_product_attention, fullgraph=True, backend=counter)
    compiled(**grads, **others, **options)
    assert counter.frame_count == 1
    targets = {str(node.target) for graph in counter.graphs for node in graph.graph.nodes}
    assert any(t.startswith("fused_attention.") for t in targets), targets


@pytest.mark.inductor
def test_compile_attention_ops_inductor():
    """The one Inductor test (slow: it compiles C++): dense attention with most extensions, and varlen."""
    grads, others, options = _sdpa_case("causal+alibi+window+softcap+key_lengths")
    gen = torch.Generator().manual_seed(5)  # the usual (B, S, H, D) projection layout, and a transposed mask
    grads |= {"query": _bhsd(B, HQ, L, D, gen, True), "key": _bhsd(B, HKV, S, D, gen, True)}
    grads["attn_mask"] = rand(B, 1, S, L).transpose(-1, -2).requires_grad_()
    options.pop("is_causal")  # attn_mask excludes is_causal, as in torch
    options["return_lse"] = True
    _compare_with_eager(fused_attention.scaled_dot_product_attention, grads, others, options, "inductor")
    _compare_with_eager(fused_attention.varlen_attention, *_varlen_case(batched_alibi=True), "inductor")


def _varlen_case(batched_alibi: bool = False, **options):
    """(tensors that require grad, other tensors, keyword options) for ``varlen_attention``."""
    values = _detached(_varlen_values(batched_alibi, dropout=False))
    grads = {n: values[n] for n in ("q", "k", "v")}
    others = {n: values[n] for n in ("cu_seqlens_q", "cu_seqlens_k")}
    others |= {"max_seqlen_q": 11, "max_seqlen_k": 12}
    if batched_alibi:
        options |= {"alibi_slopes": values["alibi"], "is_causal": True, "return_lse": True}
    return grads, others, options


@pytest.mark.parametrize(
    "options", [{}, {"is_causal": True, "window_size": (4, 0), "softcap": 3.0, "return_lse": True}], ids=str
)
def test_compile_varlen_aot_eager(options):
    if options:
        options = {**options, "alibi_slopes": alibi_slopes(HQ)}
    _compare_with_eager(fused_attention.varlen_attention, *_varlen_case(**options), "aot_eager")


# ---------------------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------------------


class _AlibiAttention(torch.nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(heads))

    def forward(self, q, k, v):
        return fused_attention.scaled_dot_product_attention(
            q, k, v, is_causal=True, alibi_slopes=self.slopes, enable_gqa=True
        )


def test_export_module_with_alibi():
    module = _AlibiAttention(HQ)
    q, k, v = rand(B, HQ, L, D), rand(B, HKV, S, D), rand(B, HKV, S, DV)
    exported = torch.export.export(module, (q, k, v))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert any(t.startswith("fused_attention.") for t in targets), targets
    q2, k2, v2 = rand(B, HQ, L, D), rand(B, HKV, S, D), rand(B, HKV, S, DV)
    torch.testing.assert_close(exported.module()(q2, k2, v2), module(q2, k2, v2), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# python -m fused_attention check
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_check_passes():
    """The self-test, as a user runs it (a fresh process: about 5 s on 2 CPU cores): without the
    session's ``TRITON_INTERPRET`` (the Triton kernels' own tests run them under the interpreter)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "fused_attention", "check"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " PASS" in result.stdout and " FAIL" not in result.stdout, result.stdout


def test_cli_info(capsys):
    from fused_attention.__main__ import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and fused_attention.__version__ in out
    from fused_attention.backends import BACKENDS

    for name, backend in BACKENDS.items():  # one line per backend, saying whether it is available and why not
        line = next(line for line in out.split("attention backends:")[1].splitlines() if line.split()[:1] == [name])
        reason = backend.unavailable_reason()
        assert ("unavailable" in line and reason in line) if reason else ("available" in line and "unavailable" not in line)
