"""The torch backend's chunked math with many small chunks (every block boundary, key-range skip and
per-chunk dropout seed exercised), and proof that hidden tiles are skipped, not computed."""

from __future__ import annotations

import pytest
import torch
from conftest import check_attention, rand
from test_attention import PAIRS, TRIPLES, _inputs

import fused_attention
from fused_attention.kernels import chunked


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(chunked, "_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(chunked, "_MIN_CHUNK", 3)


@pytest.mark.parametrize("features", [("plain",), *PAIRS[::2], *TRIPLES], ids="+".join)
def test_many_chunks_match_reference(tiny_chunks, features):
    torch.manual_seed(20)
    q, k, v, kwargs = _inputs(set(features))
    check_attention("torch", q, k, v, **kwargs)


def test_many_chunks_varlen_and_dropout_gradcheck(tiny_chunks):
    torch.manual_seed(21)
    q, k, v = (rand(1, 2, 11, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        torch.manual_seed(5)
        return fused_attention.scaled_dot_product_attention(
            q, k, v, dropout_p=0.3, window_size=(4, 1), alibi_slopes=torch.rand(2), backend="torch"
        )

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize(
    "n,kwargs,min_fraction,max_fraction",
    [(8192, {"window_size": (255, 0)}, 256 / 8192, 0.06), (2048, {"is_causal": True}, 0.5, 0.57), (2048, {}, 1.0, 1.0)],
    ids=["window", "causal", "full"],
)
def test_hidden_tiles_are_skipped(monkeypatch, n, kwargs, min_fraction, max_fraction):
    """L = S = 8192 with a 256-wide window visits ~4% of the L x S scores; causal about half (plus the
    diagonal blocks: 9/16 at 8 row blocks). Never less than the visible fraction: the visible scores
    are computed."""
    visited = []
    monkeypatch.setattr(chunked, "visit_hook", lambda i0, i1, j0, j1: visited.append((i1 - i0) * (j1 - j0)))
    q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
    fused_attention.scaled_dot_product_attention(q, k, v, softcap=50.0, backend="torch", **kwargs)
    fraction = sum(visited) / (n * n)
    assert min_fraction * 0.99 <= fraction <= max_fraction
