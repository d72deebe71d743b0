"""Triton launch grids within CUDA's limits: a grid's second and third axes hold at most 65535 programs
(the first 2**31 - 1), so no launcher may put the batch there whole. The attention passes put (block,
head, batch) on the first axis when the batch needs it (``program_coordinates`` decodes it); the
positional kernels launch the batch in slices. The interpreter enforces no limit, so the grids are checked
as the launchers build them (those calls record their launches and run nothing), and the flat grid's
kernels run on a small batch with the limit lowered.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools

import pytest
from conftest import check_attention, check_varlen, rand

pytest.importorskip("triton")

import triton
import triton.language as tl

from fused_attention.kernels.triton import GRID_YZ_MAX, triton_unavailable_reason
from fused_attention.kernels.triton import attention_launch as launch
from fused_attention.kernels.triton import rotary as rotary_kernels
from fused_attention.kernels.triton import sinusoidal as sinusoidal_kernels
from fused_attention.kernels.triton.attention_tiles import program_coordinates

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 2 * GRID_YZ_MAX + 7  # three slices, the last of 7

pytestmark = pytest.mark.skipif(triton_unavailable_reason(DEVICE) is not None,
                                reason=str(triton_unavailable_reason(DEVICE)))


def _within_limits(grid) -> bool:
    return len(grid) <= 3 and grid[0] < 2**31 and all(n <= GRID_YZ_MAX for n in grid[1:])


@triton.jit
def _coordinates_kernel(Out, seq, slots, BLOCK: tl.constexpr, FLAT: tl.constexpr):
    block, slot, batch = program_coordinates(seq, BLOCK, slots, FLAT)
    pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    tl.store(Out + 3 * pid, block)
    tl.store(Out + 3 * pid + 1, slot)
    tl.store(Out + 3 * pid + 2, batch)


@pytest.mark.parametrize("flat", [False, True])
def test_program_coordinates_enumerate_blocks_then_slots_then_batch(flat):
    """Both grids give every (block, slot, batch) once, in the same order: blocks fastest."""
    seq, block, slots, batch = 37, 16, 5, 3
    blocks = triton.cdiv(seq, block)
    out = torch.full((blocks * slots * batch, 3), -1, dtype=torch.int32, device=DEVICE)
    grid = (out.shape[0],) if flat else (blocks, slots, batch)
    _coordinates_kernel[grid](out, seq, slots, BLOCK=block, FLAT=flat)
    expected = [(m, h, b) for b, h, m in itertools.product(range(batch), range(slots), range(blocks))]
    assert out.cpu().tolist() == [list(c) for c in expected]


def _problem(batch: int, heads: int, kv_heads: int, seq_q: int, seq_k: int) -> launch.Problem:
    q = torch.empty(1, heads, seq_q, 64).expand(batch, -1, -1, -1)  # (stride 0: no memory)
    k = torch.empty(1, kv_heads, seq_k, 64).expand(batch, -1, -1, -1)
    return launch.Problem(q, k, k, None, None, None, None, None, seq_q, seq_k, False, -1, -1, 0.0, 0.125, 0.0, 0)


@pytest.mark.parametrize("pass_name", ["forward", "backward_dq", "backward_dkdv"])
@pytest.mark.parametrize("batch", [GRID_YZ_MAX, BATCH])
def test_attention_grids_hold_any_batch(pass_name, batch):
    """Up to 65535 sequences the three-axis grid the kernels were tuned with (FLAT_GRID off: the kernels
    compile as before); past it, one axis with FLAT_GRID on."""
    problem = _problem(batch, 12, 4, 100, 300)
    grid = problem.grid(pass_name, 64, splits=3)
    assert _within_limits(grid), grid
    blocks = triton.cdiv(300 if pass_name == "backward_dkdv" else 100, 64)
    slots = 4 * 3 if pass_name == "backward_dkdv" else 12
    flat = batch > GRID_YZ_MAX
    assert grid == ((blocks * slots * batch,) if flat else (blocks, slots, batch))
    assert problem.shared_args()["FLAT_GRID"] is flat


def test_attention_grid_past_the_first_axis_is_refused():
    problem = _problem(2**20, 64, 64, 2**12, 2**12)  # 2**32 programs of 64 rows
    with pytest.raises(ValueError, match="2\\*\\*31 - 1"):
        problem.grid("forward", 64)


def test_flat_grid_kernels_meet_the_reference(monkeypatch):
    """Every pass with FLAT_GRID on (the limit lowered to 2, so a batch of 3 takes it), dense and packed,
    with the features whose indexing follows the batch, the heads and the blocks (the ALiBi slope
    gradient's per-block rows with sinks, the float mask's gradient)."""
    monkeypatch.setattr(launch, "GRID_YZ_MAX", 2)
    gen = torch.Generator().manual_seed(3)
    q = rand(3, 4, 37, 16, gen=gen, requires_grad=True)
    k, v = (rand(3, 2, 53, 16, gen=gen, requires_grad=True) for _ in range(2))
    slopes = torch.rand(3, 4, generator=gen).requires_grad_()
    sinks = torch.randn(4, generator=gen).requires_grad_()
    check_attention("triton", q, k, v, enable_gqa=True, is_causal=True, alibi_slopes=slopes, sinks=sinks,
                    key_lengths=torch.tensor([53, 20, 1]))
    mask = rand(3, 1, 37, 53, gen=gen, requires_grad=True)  # its gradient sums over the heads
    check_attention("triton", q, k, v, enable_gqa=True, attn_mask=mask)
    cu_q, cu_k = torch.tensor([0, 5, 17, 40], dtype=torch.int32), torch.tensor([0, 30, 31, 60], dtype=torch.int32)
    q = rand(40, 4, 16, gen=gen, requires_grad=True)
    k, v = (rand(60, 2, 16, gen=gen, requires_grad=True) for _ in range(2))
    check_varlen("triton", q, k, v, cu_q, cu_k, is_causal=True)


class _Recorder:
    """Stands in for a kernel: records each launch's grid and the batch its tensor arguments span."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.launches.append((grid, args[0].shape[0], args[0].data_ptr()))
        return launch_


def _check_slices(launches, x: torch.Tensor) -> None:
    assert launches and all(_within_limits(grid) for grid, _, _ in launches), [g for g, _, _ in launches]
    starts = [x[b:].data_ptr() for b in itertools.accumulate([0] + [n for _, n, _ in launches[:-1]])]
    assert [ptr for _, _, ptr in launches] == starts  # each slice begins where the last ended
    assert sum(n for _, n, _ in launches) == x.shape[0]


def test_rotary_launches_the_batch_in_slices(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(rotary_kernels, "_rotary_kernel", recorder)
    q = torch.zeros(BATCH, 2, 1, 8, device=DEVICE)
    cos = sin = torch.ones(4, 4, device=DEVICE)
    positions = torch.zeros(BATCH, 2, dtype=torch.int64, device=DEVICE)
    rotary_kernels.rotary(q, q, None, None, cos, sin, positions, False, False)
    _check_slices(recorder.launches, q)
    assert [grid for grid, _, _ in recorder.launches] == [(2, GRID_YZ_MAX), (2, GRID_YZ_MAX), (2, 7)]


def test_sinusoidal_launches_the_batch_in_slices(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(sinusoidal_kernels, "_add_sinusoidal_kernel", recorder)
    x = torch.zeros(BATCH, 3, 8, device=DEVICE)
    offsets = torch.zeros(BATCH, dtype=torch.int64, device=DEVICE)
    sinusoidal_kernels.add_sinusoidal(x, x, offsets, 0, 10000.0)
    _check_slices(recorder.launches, x)
    recorder.launches.clear()
    sinusoidal_kernels.add_sinusoidal(x, x, None, 0, 10000.0)  # one launch: each program adds to every entry
    assert len(recorder.launches) == 1 and recorder.launches[0][0][1] == 1
