"""fused_attention.overlap.share_elements against a brute-force comparison of the bytes two views cover,
by its search and by its fallback (marking the bytes)."""

from __future__ import annotations

import random

import pytest
import torch

from fused_attention import overlap


def _bytes(t: torch.Tensor) -> set[int]:
    offsets = torch.arange(t.untyped_storage().nbytes()).as_strided(t.shape, t.stride(), 0) * t.element_size()
    return {t.data_ptr() + int(o) + k for o in offsets.flatten() for k in range(t.element_size())}


def _random_views(count: int):
    rng = random.Random(0)
    storage = torch.zeros(1000)

    def view() -> torch.Tensor:
        dims = rng.randint(1, 3)
        t = storage.as_strided([rng.randint(1, 5) for _ in range(dims)],
                               [rng.randint(0, 12) for _ in range(dims)], rng.randint(0, 30))
        return t.view(torch.int16) if t.stride(-1) == 1 and rng.random() < 0.3 else t  # bytes, not elements

    for _ in range(count):
        yield view(), view()


@pytest.mark.parametrize("search", [True, False], ids=["search", "marks"])
def test_share_elements_is_exact(search, monkeypatch):
    if not search:
        monkeypatch.setattr(overlap, "_SEARCH_BUDGET", 0)
    shared = 0
    for a, b in _random_views(1500):
        expected = bool(_bytes(a) & _bytes(b))
        assert overlap.share_elements(a, b) == expected, (a.shape, a.stride(), a.storage_offset(), b.shape,
                                                          b.stride(), b.storage_offset(), b.dtype)
        shared += expected
    assert 100 < shared < 1400  # both answers were asked for


def test_share_elements_of_fused_qkv_views():
    qkv = torch.randn(2, 7, 3, 4, 16)
    q, k, v = qkv.unbind(2)
    assert not overlap.share_elements(q, k) and not overlap.share_elements(k, v)
    assert overlap.share_elements(q, qkv[:, 3:4, 0, 1:2, 5:6])
    assert not overlap.share_elements(q, torch.randn(2, 7, 4, 16))
    assert not overlap.share_elements(q[:, :0], q)
