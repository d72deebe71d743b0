"""The lean call path: the common call copies nothing and broadcasts nothing, eager ops build an autograd
node only when a gradient is needed (and then the right one), dispatch decisions are remembered but
forgotten when a backend changes, and the whole-model benchmark runs (``--quick``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import fused_attention
from fused_attention import backends
from fused_attention.backends import BACKENDS, Capabilities
from fused_attention.inputs import canonicalize

REPO = Path(fused_attention.__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("FUSED_ATTENTION_BACKEND", raising=False)


def _qkv(*shape, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def test_the_common_call_neither_broadcasts_nor_copies(monkeypatch):
    def no_broadcast(*shapes):
        raise AssertionError("torch.broadcast_shapes on the common path")

    monkeypatch.setattr(torch, "broadcast_shapes", no_broadcast)
    q, k, v = _qkv(2, 4, 5, 8)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    for kwargs, kv in (({}, (k, v)), ({"attn_mask": mask}, (k, v)), ({"enable_gqa": True}, (k[:, :2], v[:, :2]))):
        inputs = canonicalize(q, *kv, **kwargs)
        assert inputs.query is q and inputs.key is kv[0] and inputs.value is kv[1]
        assert inputs.attn_mask is kwargs.get("attn_mask")
        out = fused_attention.scaled_dot_product_attention(q, *kv, **kwargs)
        assert out.shape == q.shape


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_no_autograd_node_without_a_gradient(backend):
    if BACKENDS[backend].unavailable_reason():
        pytest.skip(BACKENDS[backend].unavailable_reason())
    q, k, v = _qkv(1, 2, 7, 16)
    assert fused_attention.scaled_dot_product_attention(q, k, v, backend=backend).grad_fn is None
    qg = q.clone().requires_grad_()
    assert fused_attention.scaled_dot_product_attention(qg, k, v, backend=backend).grad_fn is not None
    with torch.no_grad():
        assert fused_attention.scaled_dot_product_attention(qg, k, v, backend=backend).grad_fn is None


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_alibi_slopes_alone_get_their_gradient(backend):
    """Only the slopes require grad: the call must still build the node that reaches them."""
    if BACKENDS[backend].unavailable_reason():
        pytest.skip(BACKENDS[backend].unavailable_reason())
    q, k, v = _qkv(1, 3, 6, 8)
    slopes = torch.rand(3, requires_grad=True)
    upstream = torch.randn(1, 3, 6, 8)
    (grad_alone,) = torch.autograd.grad(
        fused_attention.scaled_dot_product_attention(q, k, v, alibi_slopes=slopes, backend=backend), slopes, upstream
    )
    qg = q.clone().requires_grad_()
    out = fused_attention.scaled_dot_product_attention(qg, k, v, alibi_slopes=slopes, backend=backend)
    _, grad_with_q = torch.autograd.grad(out, (qg, slopes), upstream)
    assert grad_alone.abs().sum() > 0
    torch.testing.assert_close(grad_alone, grad_with_q, rtol=0, atol=0)


def test_varlen_without_a_gradient_builds_no_node():
    q, k, v = (torch.randn(10, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 4, 10])
    assert fused_attention.varlen_attention(q, k, v, cu, cu, 6, 6).grad_fn is None
    assert fused_attention.varlen_attention(q.requires_grad_(), k, v, cu, cu, 6, 6).grad_fn is not None


def test_a_remembered_decision_is_forgotten_when_a_backend_changes(monkeypatch):
    q, k, v = _qkv(1, 2, 4, 8)
    slopes = torch.rand(2)
    fused_attention.scaled_dot_product_attention(q, k, v, alibi_slopes=slopes)  # remembered
    limited = Capabilities(device_types=None, dtypes=frozenset({torch.float32}),
                           features=backends.ALL_FEATURES - {"alibi"})
    for backend in BACKENDS.values():
        monkeypatch.setattr(backend, "capabilities", limited)
    with pytest.raises(ValueError, match="features not supported: alibi"):
        fused_attention.scaled_dot_product_attention(q, k, v, alibi_slopes=slopes)


def test_a_decision_depends_on_the_call_signature(monkeypatch):
    """Calls that differ in a feature a backend refuses are decided apart."""
    limited = Capabilities(device_types=None, dtypes=frozenset({torch.float32, torch.float64}),
                           features=backends.ALL_FEATURES - {"softcap"})
    first = backends.priority("cpu")[0]
    monkeypatch.setattr(BACKENDS[first], "capabilities", limited)
    q, k, v = _qkv(1, 2, 4, 8)
    calls = []
    for name, backend in BACKENDS.items():
        original = backend.attention
        monkeypatch.setattr(backend, "attention", lambda inputs, _n=name, _o=original: calls.append(_n) or _o(inputs))
    fused_attention.scaled_dot_product_attention(q, k, v)
    fused_attention.scaled_dot_product_attention(q, k, v, softcap=20.0)
    fused_attention.scaled_dot_product_attention(q, k, v)
    assert calls[0] == calls[2] == first and calls[1] != first


def _models_module():
    spec = importlib.util.spec_from_file_location("bench_models", REPO / "benchmarks" / "models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_models"] = module
    spec.loader.exec_module(module)
    return module


def test_models_benchmark_quick(capsys, tmp_path):
    models = _models_module()
    wanted = ["encoder-infer", "encoder-train", "classic-infer", "classic-train"]
    if importlib.util.find_spec("transformers") is not None:
        wanted += ["llama-decode", "bert-base"]
    rows = models.main(["--quick", "--models", ",".join(wanted), "--out", str(tmp_path)])
    assert len(rows) == len(wanted) and all(r.torch_ms > 0 and r.ours_ms > 0 for r in rows)
    text = capsys.readouterr().out
    assert "| model | workload |" in text and "--quick" in text
    assert (tmp_path / "models.md").read_text().count("\n|") == len(wanted) + 2  # header, rule, rows
