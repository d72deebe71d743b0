"""Ahead-of-time compile of every Triton attention kernel specialization dispatch can launch, for sm_80
and sm_90, with Triton's compiler (``triton.compile(ASTSource(...), target=GPUTarget(...))``: no GPU).

The interpreter never runs Triton's compiler, so a kernel it runs could still be rejected on a GPU;
this test makes such a kernel fail CI, and also one whose shared memory exceeds what the architecture
can give a block (it would fail at launch). The specializations come from the real launchers, run on
meta tensors with the launch intercepted: the same arguments, compile-time flags and autotune
candidates as a real call. The set is bounded (see :func:`specs`): every autotune candidate of every
pass at the head dims and dtypes that need the most shared memory, all features on (the largest
kernels) for both architectures, and every dtype (float32 with IEEE and TF32 matmuls), padded head dim
(16 to 256) and feature variant (bool mask, mask-gradient reductions, varlen, a value head dim unlike
the query's, deterministic mode) at least once.

Compiled as the GPU runs them: ``tools/triton_aot.py`` takes the specialization from Triton's own JIT
binder (16-byte-aligned pointers, ints divisible by 16, ints equal to 1 as constants). The tile dispatch
launches first must also not spill in 16-bit configs nor run ``mma.sync`` in an sm_90 loop (see
:func:`_static_failures`); the autotuner drops at run time the other tiles that spill.

Run as a script (``python tests/test_triton_compile.py``) it compiles in parallel and prints failures;
the test runs it in a fresh process without ``TRITON_INTERPRET`` (kernels must be real JIT functions).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import triton_aot  # tools/ is not a package

# Static goals: no spills in 16 bits at head dims up to 128, and no mma.sync in an sm_90 loop where wgmma
# is possible. Checked on the tile deterministic mode launches (the first candidate left by
# attention_configs' rules, which the autotuner then keeps: attention_launch.without_spills drops the
# others that spill at run time) in every pass, and on every forward tile without a user mask. float32
# with IEEE products (FMA loops: its own small tiles, attention_configs._IEEE_CANDIDATES) must not spill
# in any tile, masks aside.
SPILL_FREE_HEAD_DIM = 128
_MASKS = frozenset({"bool_mask", "float_mask"})


@dataclasses.dataclass(frozen=True)
class Spec:
    """One call: dtype, matmul precision, head dims, features, and whether every tile is compiled."""

    dtype: str
    tf32: bool
    head_dim: int
    value_head_dim: int
    features: frozenset[str]
    all_tiles: bool
    deterministic: bool = False
    forward_only: bool = False


ALL_FEATURES = frozenset(
    {"causal", "window", "softcap", "alibi", "float_mask", "mask_grad", "key_lengths", "dropout", "sinks"}
)


def specs() -> list[tuple[Spec, tuple[int, ...]]]:
    """``(spec, architectures)``, bounded to a few minutes on 2 cores (a kernel with every feature takes
    ~5 s): every tile with the base code at the head dims and dtypes that stress shared memory (tiles
    decide it), the largest kernels (all features, bfloat16) on both architectures, and every other
    code path (each feature variant, each dtype) once, on sm_90. Triton's on-disk cache
    makes reruns with unchanged kernels fast."""
    both, hopper = (80, 90), (90,)
    out = [(Spec(dtype, False, d, d, frozenset(), all_tiles=True), both)
           for dtype, d in (("bfloat16", 128), ("float32", 256), ("float32", 128))]
    # float32 with IEEE products: its own tiles, every one spill-free with the features on
    out.append((Spec("float32", False, 64, 64, frozenset({"causal", "window", "alibi", "softcap", "dropout",
                                                         "key_lengths"}), all_tiles=True), both))
    out.append((Spec("bfloat16", False, 128, 128, ALL_FEATURES, all_tiles=False), both))
    out += [
        (Spec("float32", True, 64, 64, frozenset(), all_tiles=False), hopper),
        (Spec("bfloat16", False, 32, 32, frozenset({"bool_mask", "causal"}), all_tiles=False), hopper),
        (Spec("bfloat16", False, 64, 128, frozenset({"varlen", "window", "softcap", "alibi", "dropout", "sinks"}),
              all_tiles=False), hopper),
        (Spec("float32", False, 128, 128, frozenset({"float_mask", "mask_grad", "mask_cols", "alibi"}),
              all_tiles=False, deterministic=True), hopper),
        (Spec("float16", False, 16, 16, frozenset({"float_mask", "mask_grad", "mask_rows", "key_lengths"}),
              all_tiles=False), hopper),
    ]
    # the static goals (no spills in 16 bits, head dims 64 and 128, with and without dropout) beyond the
    # bfloat16 specs above: the forward's every tile at 64 with dropout; every pass's first tile in float16
    # at 128 with dropout, and with a user mask at 64
    out.append((Spec("float16", False, 64, 64, frozenset({"dropout", "causal"}), all_tiles=True,
                     forward_only=True), both))
    out.append((Spec("float16", False, 128, 128, frozenset({"dropout", "causal"}), all_tiles=False), both))
    out.append((Spec("bfloat16", False, 64, 64, frozenset({"bool_mask", "window"}), all_tiles=False), both))
    return out


def _wgmma_possible(pass_name: str, tile) -> bool:
    """Whether a tile's matmuls can be warpgroup MMAs: each warp of a warpgroup takes 16 of the held
    block's rows, so the block must have 16 rows per warp (the key block in dK/dV, the query block else)."""
    held = tile.block_n if pass_name == "backward_dkdv" else tile.block_m
    return held >= 16 * tile.num_warps


def _static_failures(label: str, pass_name: str, spec: Spec, arch: int, tile, first: bool, compiled) -> list[str]:
    """Spills in 16 bits at head dims up to :data:`SPILL_FREE_HEAD_DIM` (the tile dispatch launches first,
    and every forward tile without a user mask) or in any float32-IEEE tile (no user mask), and
    ``mma.sync`` in an sm_90 loop of those tiles where wgmma is possible (16-bit or TF32 operands)."""
    ieee = spec.dtype == "float32" and not spec.tf32
    sixteen_bit = spec.dtype != "float32"
    masked = bool(spec.features & _MASKS)
    held = first or (pass_name == "forward" and not masked)
    check_spills = (ieee and not masked) or (
        held and sixteen_bit and max(spec.head_dim, spec.value_head_dim) <= SPILL_FREE_HEAD_DIM)
    check_mma = held and arch == 90 and (sixteen_bit or spec.tf32) and _wgmma_possible(pass_name, tile)
    if not (check_spills or check_mma):
        return []
    failures = []
    stats = triton_aot.stats(compiled)
    if check_spills and (stats.spill_stores or stats.spill_loads):
        failures.append(f"{label}: spills ({stats.spill_stores} stores, {stats.spill_loads} loads)")
    mma_sync = [loop.instructions for loop in stats.loops if loop.mma_sync]
    if check_mma and mma_sync:
        failures.append(f"{label}: mma.sync (HMMA) in the loops of {mma_sync} instructions")
    return failures


def compile_spec(job: tuple[Spec, int]) -> list[str]:
    """Compiles every launch of one spec for one architecture; returns failure lines."""
    spec, arch = job
    call = triton_aot.Call(spec.dtype, spec.tf32, spec.head_dim, spec.value_head_dim, spec.features,
                           spec.deterministic)
    failures = []
    for kernel, pass_name, args in triton_aot.launches(call, arch):
        if spec.forward_only and pass_name != "forward":
            continue
        tiles = triton_aot.tiles_for(pass_name, args, arch, spec.deterministic)
        for index, tile in enumerate(tiles if spec.all_tiles else tiles[:1]):
            label = f"sm_{arch} {kernel.__name__} {spec} {tile}"
            try:
                compiled = triton_aot.compile_launch(kernel, args, arch, tile)
            except Exception as error:  # noqa: BLE001  (every rejection is reported, then fails the test)
                failures.append(f"{label}: {type(error).__name__}: {str(error)[-1500:]}")
                continue
            if compiled.metadata.shared > triton_aot.SHARED_LIMIT[arch]:
                failures.append(f"{label}: {compiled.metadata.shared} bytes of shared memory > "
                                f"{triton_aot.SHARED_LIMIT[arch]}")
            failures += _static_failures(label, pass_name, spec, arch, tile, index == 0, compiled)
    return failures


# Static goals per forward key tile (SASS instructions per loop iteration; sm_90, bfloat16, head dim 128,
# L = S = 4096, the tile dispatch launches first): a causal or windowed interior tile costs what a plain
# one does, a causal diagonal at most 1.4x, and a window edge (window (256, 0): its right edge is the
# diagonal), an ALiBi or a softcap tile at most 1.3x the plain tile of the same kind.
TILE_COST_FEATURES = ("plain", "causal", "window", "alibi", "softcap")


def forward_tile_costs() -> dict[str, list[int]]:
    """Feature -> instructions per iteration of each forward loop, in code order (plain, causal, ALiBi,
    softcap: interior / masked / ragged; window: left edge / interior / masked / rest)."""
    costs = {}
    for name in TILE_COST_FEATURES:
        features = frozenset() if name == "plain" else frozenset({name})
        call = triton_aot.Call("bfloat16", False, 128, 128, features, batch=2, heads=16, kv_heads=16,
                               seq_q=4096, seq_k=4096)
        for kernel, pass_name, args in triton_aot.launches(call, 90):
            if pass_name == "forward":
                tile = triton_aot.tiles_for(pass_name, args, 90)[0]
                stats = triton_aot.stats(triton_aot.compile_launch(kernel, args, 90, tile))
                costs[name] = [loop.instructions for loop in stats.loops]
    return costs


def tile_cost_failures(costs: dict[str, list[int]]) -> list[str]:
    interior, masked = costs["plain"][0], costs["plain"][1]
    checks = [
        ("causal interior", costs["causal"][0], interior, 1.0),
        ("causal diagonal", costs["causal"][1], interior, 1.4),
        ("window left edge", costs["window"][0], interior, 1.3),
        ("window interior", costs["window"][1], interior, 1.0),
        ("window right edge", costs["window"][2], interior, 1.3),
        ("alibi interior", costs["alibi"][0], interior, 1.3),
        ("alibi masked", costs["alibi"][1], masked, 1.3),
        ("softcap interior", costs["softcap"][0], interior, 1.3),
        ("softcap masked", costs["softcap"][1], masked, 1.3),
    ]
    return [f"{what}: {n} instructions > {limit}x {base}" for what, n, base, limit in checks if n > limit * base]


def main() -> int:
    if "--tile-costs" in sys.argv:
        costs = forward_tile_costs()
        print(costs)
        failures = tile_cost_failures(costs)
        print("\n".join(failures))
        return 1 if failures else 0
    jobs = [(spec, arch) for spec, archs in specs() for arch in archs]
    workers = int(os.environ.get("COMPILE_JOBS", os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        failures = [line for lines in pool.map(compile_spec, jobs) for line in lines]
    print(f"compiled {len(jobs)} (spec, arch) jobs; {len(failures)} failures")
    for line in failures:
        print(line)
    return 1 if failures else 0


def test_every_launched_specialization_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(Path(__file__))], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]


def test_forward_tile_costs_meet_the_static_goals():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(Path(__file__)), "--tile-costs"], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]


if __name__ == "__main__":
    sys.exit(main())
