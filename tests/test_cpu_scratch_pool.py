"""The ``cpu`` kernels' large scratch blocks (K and V packed up front, ``KeyTiles``) come back from a pool
(``BlockPool`` in csrc/cpu/aligned_buffer.h) instead of fresh pages: a later call does not fault its
tiles' pages in again, and a reused block's old contents (here NaN) never reach a result."""

from __future__ import annotations

import resource
import sys

import pytest
import torch
from conftest import check_attention, rand

import fused_attention
from fused_attention.backends import BACKENDS

pytestmark = pytest.mark.skipif(
    BACKENDS["cpu"].unavailable_reason() is not None, reason=str(BACKENDS["cpu"].unavailable_reason())
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="minor page faults as Linux counts them")
def test_a_second_call_does_not_fault_its_tiles_in_again():
    # 65 query rows: the blocked forward, whose K and V tiles (2 heads x 4096 keys x 256 floats: 8 MiB,
    # 2048 pages) are packed up front.
    gen = torch.Generator().manual_seed(0)
    q = rand(1, 2, 65, 128, gen=gen)
    k, v = (rand(1, 2, 4096, 128, gen=gen) for _ in range(2))
    out = torch.empty_like(q)  # results written into memory that is already there

    def call():
        out.copy_(fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu"))

    call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    call()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2048 // 8, faults  # (a fresh block: about 2048)


def test_reused_blocks_hold_no_stale_values():
    """A call over NaN keys and values leaves NaN in the pooled tiles; calls with fewer keys (a ragged
    last panel) and key lengths then reuse those blocks, forward and backward."""
    gen = torch.Generator().manual_seed(1)
    q = rand(1, 2, 65, 128, gen=gen)
    nan = torch.full((1, 2, 4096, 128), float("nan"))
    assert fused_attention.scaled_dot_product_attention(q, nan, nan, backend="cpu").isnan().all()
    k, v = (rand(1, 2, 4090, 128, gen=gen) for _ in range(2))
    check_attention("cpu", q, k, v, grad=False)
    check_attention("cpu", q, k, v, grad=False, key_lengths=torch.tensor([3000]))
    qb = rand(1, 2, 1500, 64, gen=gen)  # the backward's tiles (four layouts of K and V: 3 MiB)
    nan = torch.full((1, 2, 1500, 64), float("nan"))
    q_nan = qb.clone().requires_grad_()
    out = fused_attention.scaled_dot_product_attention(q_nan, nan, nan, backend="cpu")
    assert torch.autograd.grad(out.sum(), q_nan)[0].isnan().all()
    kb, vb = (rand(1, 2, 1490, 64, gen=gen) for _ in range(2))
    check_attention("cpu", qb.requires_grad_(), kb.requires_grad_(), vb.requires_grad_(), window_size=(-1, 0))
