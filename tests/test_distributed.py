"""Context parallelism on gloo: 2, 3 and 4 spawned ranks (one spawn per group size runs every case)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from filelock import FileLock  # a dependency of torch

import fused_attention
from fused_attention.backends.dispatch import BACKENDS
from fused_attention.distributed import merge_attention_states
from fused_attention.inputs import canonicalize

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available() or sys.platform == "win32",
    reason="needs torch.distributed with gloo",
)

_TIMEOUT_S = 240  # per group size; a hang anywhere fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_states(out_dir, world: int) -> str:
    """Where each rank was (its last case) and what faulthandler printed when it died."""
    lines = []
    for r in range(world):
        progress, fault = (out_dir / f"rank{r}.{ext}" for ext in ("progress", "fault"))
        lines.append(f"rank {r}: {progress.read_text() if progress.exists() else 'no progress written'}")
        stacks = fault.read_text().strip() if fault.exists() else ""
        if stacks:
            lines.append(stacks)
    return "\n".join(lines)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """``{world: [per-rank {case: [status, seconds]}]}``, spawned once per group size and session: under
    pytest-xdist the workers share the results through the session's temporary directory (the first to
    need a group size spawns it while the others wait on its lock)."""
    import distributed_cases

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    cache: dict[int, list[dict]] = {}

    def spawn(world: int, out_dir) -> None:
        out_dir.mkdir()
        ctx = mp.start_processes(distributed_cases.worker, args=(world, _free_port(), str(out_dir)),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + _TIMEOUT_S
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    for p in ctx.processes:  # faulthandler writes each rank's stacks on SIGUSR1
                        os.kill(p.pid, signal.SIGUSR1)
                    time.sleep(2)
                    for p in ctx.processes:
                        p.kill()
                    states = _rank_states(out_dir, world)
                    pytest.fail(f"{world} ranks did not finish within {_TIMEOUT_S} s\n{states}")
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:  # a rank died or raised
            pytest.fail(f"{e}\n{_rank_states(out_dir, world)}")
        (out_dir / "done").touch()

    def run(world: int) -> list[dict]:
        if world not in cache:
            out_dir = root / f"ranks{world}"
            with FileLock(str(root / f"ranks{world}.lock")):
                if not (out_dir / "done").exists():
                    if out_dir.exists():  # an earlier spawn failed: its test reported why
                        pytest.fail(f"the {world} ranks spawned earlier in this session did not finish")
                    spawn(world, out_dir)
            cache[world] = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
        return cache[world]

    return run


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("case", __import__("distributed_cases").CASE_NAMES)
def test_case(spawned, world, case):
    results = spawned(world)
    for rank, per_rank in enumerate(results):
        status, _ = per_rank[case]
        assert status == "ok", f"rank {rank} of {world}: {status}"


def test_ulysses_gqa_two_ranks(spawned):
    for rank, per_rank in enumerate(spawned(2)):
        assert per_rank["ulysses_f32_gqa"][0] == "ok", f"rank {rank}: {per_rank['ulysses_f32_gqa'][0]}"


def test_merge_states_empty_sides():
    out = torch.randn(2, 3, 4)
    lse = torch.randn(2, 3)
    lse[0, 1] = float("-inf")
    empty_out, empty_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    merged, merged_lse = merge_attention_states([out, empty_out], [lse, empty_lse])
    assert torch.equal(merged_lse, lse) and torch.allclose(merged[lse.isfinite()], out[lse.isfinite()])
    both, both_lse = merge_attention_states([empty_out, empty_out], [empty_lse, empty_lse])
    assert not both.isnan().any() and torch.equal(both, empty_out) and torch.isneginf(both_lse).all()


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_backend_attention_backward_matches_autograd(backend):
    """The entry the ring's block backward calls (gradients from the inputs alone, no forward) gives
    autograd's gradients of the same backend, with what the ring passes: a (B, H, L, 1) float mask,
    sinks, a band window, softcap, GQA; a backend whose backward needs its forward answers None."""
    chosen = BACKENDS[backend]
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 9, 8, generator=gen)
    k, v = (torch.randn(2, 2, 11, 8, generator=gen) for _ in range(2))
    dout = torch.randn(2, 4, 9, 8, generator=gen)
    shift = torch.randn(2, 4, 9, 1, generator=gen)
    kwargs = {"window_size": (-1, 1), "softcap": 2.0, "sinks": torch.randn(4, generator=gen)}
    inputs = canonicalize(q, k, v, shift, 0.0, False, None, True, **kwargs)
    if chosen.not_supported_reasons(inputs):
        pytest.skip(f"{backend}: {chosen.not_supported_reasons(inputs)}")
    grads = chosen.attention_backward(inputs, dout, need_mask_grad=True)
    if backend == "triton":
        assert grads is None
        return
    leaves = [t.clone().requires_grad_() for t in (q, k, v, shift)]
    out = fused_attention.scaled_dot_product_attention(
        *leaves[:3], attn_mask=leaves[3], enable_gqa=True, backend=backend, **kwargs
    )
    expected = torch.autograd.grad(out, leaves, dout)
    for name, mine, ref in zip(("dq", "dk", "dv", "dmask"), grads, expected, strict=True):
        assert torch.equal(mine, ref), f"{name} differs from autograd's"
    assert chosen.attention_backward(inputs, dout)[3] is None
