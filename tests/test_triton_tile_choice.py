"""Which tiles a Triton attention launch may run, decided without a GPU: the static rules of
``attention_configs`` (what deterministic mode launches) and the autotuner's run-time pruning of tiles the
compiler spills for (``attention_launch.without_spills``), driven here by a stand-in compiler that
reports spill counts. ``tests/test_triton_compile.py`` checks the real compiler's output for sm_80/sm_90."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import triton_aot  # tools/ is not a package

from fused_attention.kernels.triton import attention_configs as configs
from fused_attention.kernels.triton import attention_launch as launch

Tile = configs.Tile
A, B, C, SMALL = Tile(128, 64, 8, 3), Tile(64, 64, 4, 3), Tile(64, 32, 4, 2), Tile(16, 16, 4, 1)


def test_spilling_tiles_are_dropped_when_another_does_not_spill():
    counts = {A: 12, B: 0, C: None}  # None: the compiler could not say; kept for the autotuner
    assert launch.without_spills([A, B, C], counts.get, SMALL) == [B, C]


def test_every_tile_spills_then_the_last_resort_runs_if_it_does_not():
    assert launch.without_spills([A, B], {A: 3, B: 1, SMALL: 0}.get, SMALL) == [SMALL]
    assert launch.without_spills([A, B], {A: 3, B: 1, SMALL: 2}.get, SMALL) == [A, B]


def test_nothing_known_leaves_the_candidates_to_the_autotuner():
    assert launch.without_spills([A, B], {}.get, SMALL) == [A, B]


def _launch(features: frozenset[str], arch: int, pass_name: str, **call) -> dict:
    """The arguments the real launcher passes for one pass (meta tensors, launch intercepted)."""
    found = [args for _, name, args in triton_aot.launches(triton_aot.Call(features=features, **call), arch)
             if name == pass_name]
    assert found, pass_name
    return found[0]


@pytest.mark.parametrize(("arch", "pass_name", "features", "call", "pruned"), [
    # float16 at head dim 128 spills in sm_90's 128x128 forward tile; bfloat16 does not
    (90, "forward", frozenset(), {"dtype": "float16"}, Tile(128, 128, 8, 3)),
    # a query-head group walked inside sm_80's dK/dV program at head dim 128
    (80, "backward_dkdv", frozenset(), {"kv_heads": 2}, Tile(32, 128, 8, 2)),
    # the mask gradient's flags reach the dK/dV tile choice (taken before the launch, for its buffer)
    (80, "backward_dkdv", frozenset({"float_mask", "mask_grad"}), {"kv_heads": 4}, Tile(16, 64, 4, 2)),
])
def test_rules_prune_the_tiles_that_spill_with_a_launch_features(arch, pass_name, features, call, pruned):
    args = _launch(features, arch, pass_name, **call)
    assert pruned not in configs.launch_candidates(pass_name, arch, args)
    plain = _launch(frozenset(), arch, pass_name, **{**call, "dtype": "bfloat16", "kv_heads": 4, "head_dim": 64,
                                                     "value_head_dim": 64})
    assert pruned in configs.launch_candidates(pass_name, arch, plain)


class _StandInKernel:
    """Answers ``warmup`` as Triton's JIT does, with a compiled kernel whose ``n_spills`` comes from a
    table; records the launches it compiled."""

    def __init__(self, spills: dict[tuple[int, int], int]):
        self.spills, self.compiled = spills, []

    def warmup(self, *, grid, BLOCK_M, BLOCK_N, num_warps, num_stages, **args):
        assert "warmup" not in args and "grid" not in args
        self.compiled.append((BLOCK_M, BLOCK_N))
        return SimpleNamespace(_init_handles=lambda: None, n_spills=self.spills.get((BLOCK_M, BLOCK_N), 0))


def test_autotuner_prune_keeps_only_the_tiles_that_compile_without_spills(monkeypatch):
    monkeypatch.setattr(launch.torch.cuda, "get_device_capability", lambda *a: (9, 0))
    args = _launch(frozenset({"causal"}), 90, "forward")
    tiles = configs.launch_candidates("forward", 90, args)
    assert len(tiles) > 2
    kernel = _StandInKernel({(tiles[0].block_m, tiles[0].block_n): 40, (tiles[1].block_m, tiles[1].block_n): 2})
    configs_list = [launch._tile_config(t) for t in configs.all_candidates("forward")]
    kept = launch.tile_pruner(kernel, "forward")(configs_list, {}, **args, grid=None, warmup=False)
    kept_tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
    assert kept_tiles == {(t.block_m, t.block_n, t.num_warps, t.num_stages) for t in tiles[2:]}
    assert len(kernel.compiled) == len(tiles)


def test_a_compile_that_fails_leaves_the_tile_to_the_autotuner():
    class Failing:
        def warmup(self, **kwargs):
            raise RuntimeError("no GPU")

    assert launch._compiled_spills(Failing(), {"Q": None}, A) is None


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("features", [
    frozenset({"float_mask", "mask_grad"}), frozenset({"float_mask", "mask_grad", "mask_cols", "causal"}),
    frozenset({"bool_mask", "dropout"}), frozenset({"alibi", "window"}),
], ids=lambda f: "+".join(sorted(f)))
def test_deterministic_dkdv_tile_is_chosen_before_the_launch_as_at_it(monkeypatch, arch, features):
    """The dK/dV pass sizes its deterministic mask-gradient buffer (one slot per key block) with the
    tile it picks before launching; the launch must pick the same, or the kernel writes past the buffer.
    The launch's tile comes from its full arguments, so the tile rules (a mask gradient's among them)
    must see the same features before it. Compiled kernels are stood in for (the choice is made for a
    GPU launch, not the interpreter's fixed tile)."""
    monkeypatch.setattr(launch, "interpreted", lambda kernel: False)
    before = []
    original = launch.fixed_tile

    def recording(kernel, pass_name, args):
        tile = original(kernel, pass_name, args)
        if pass_name == "backward_dkdv":
            before.append(tile)
        return tile

    monkeypatch.setattr(launch, "fixed_tile", recording)
    call = triton_aot.Call(dtype="float16", features=features, deterministic=True, kv_heads=4)
    dkdv = [args for _, name, args in triton_aot.launches(call, arch) if name == "backward_dkdv"]
    assert len(dkdv) == 1 and before
    at_launch = configs.launch_candidates("backward_dkdv", arch, dkdv[0])[0]
    assert set(before) == {at_launch}


def test_autotuner_zeroes_only_the_accumulators_a_launch_has():
    """Before each timed tile (and after tuning) the dK/dV pass's mask-gradient accumulator is zeroed;
    a launch without one (None: no mask gradient) is left alone. Triton's own ``reset_to_zero`` called
    ``.zero_()`` on None there, and every autotuned backward on a GPU failed (seen on an H200)."""
    import torch

    hook = launch._zeroing(["DMask"])
    hook({"DMask": None, "DK": torch.ones(2)})
    grads = {"DMask": torch.ones(3), "DK": torch.ones(2)}
    hook(grads, reset_only=True)
    assert grads["DMask"].eq(0).all() and grads["DK"].eq(1).all()


def test_autotuner_zeroes_every_partial_sum_the_backward_writes_per_block():
    """The backward's per-block partial sums (mask gradient, slope gradient and the dQ pass's sink
    correction) are zeroed before each candidate: candidates of different block sizes write different
    numbers of slots. The names must be the kernels' own parameters (a misspelt one is skipped silently)."""
    from fused_attention.kernels.triton import attention_backward as backward

    assert {"DMask", "DAlibi"} <= set(backward.DKDV_ZEROED) <= set(backward.attention_dkdv_kernel.arg_names)
    assert {"DAlibiRows"} <= set(backward.DQ_ZEROED) <= set(backward.attention_dq_kernel.arg_names)


class _FakeAutotuner:
    """The parts of Triton's ``Autotuner`` that ``launch_tuned`` uses, recording each launch."""

    keys = ("tune_key", "CAUSAL")

    def __init__(self):
        self.launches = []
        self.fn = SimpleNamespace(run=lambda **kwargs: self.launches.append(("direct", kwargs)))

    def __getitem__(self, grid):
        def through_the_autotuner(**kwargs):
            self.launches.append(("autotuner", {**kwargs, "grid": grid}))
            self.best_config = SimpleNamespace(pre_hook=None, all_kwargs=lambda: {"BLOCK_M": 64, "num_warps": 4})

        return through_the_autotuner


def test_a_tuned_key_launches_its_config_directly():
    """The first launch of a key goes through the autotuner; the next ones launch its pick directly (the
    autotuner's per-launch key costs ~40 us); a new key value or a new dtype goes through it again."""
    import torch

    tuned, grid = _FakeAutotuner(), lambda meta: (1,)
    q16, q32 = torch.empty(2, dtype=torch.float16), torch.empty(2, dtype=torch.float32)
    calls = [{"Q": q16, "tune_key": 1, "CAUSAL": False}, {"Q": q16, "tune_key": 1, "CAUSAL": False},
             {"Q": q16, "tune_key": 2, "CAUSAL": False}, {"Q": q16, "tune_key": 1, "CAUSAL": True},
             {"Q": q32, "tune_key": 1, "CAUSAL": False}, {"Q": q32, "tune_key": 1, "CAUSAL": False}]
    for args in calls:
        launch.launch_tuned(tuned, grid, args)
    assert [way for way, _ in tuned.launches] == ["autotuner", "direct", "autotuner", "autotuner", "autotuner", "direct"]
    direct = tuned.launches[1][1]
    assert direct == {**calls[1], "grid": grid, "warmup": False, "BLOCK_M": 64, "num_warps": 4}
