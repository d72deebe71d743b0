"""Compile one attention pass with tiles of your choice and print registers, spills and SASS per loop.

    python tools/triton_tiles.py ARCH DTYPE TF32 HEAD_DIM FEATURES PASS TILES [--test-shape]

e.g. ``python tools/triton_tiles.py 90 float32 0 128 plain backward_dkdv 16x64w8s2,16x16w4s2``
(FEATURES: ``plain`` or a comma list of ``triton_aot.FEATURES``; TILES: ``MxNwWARPSsSTAGES``, comma
separated). The shape is B=2, H=16, L=S=4096, or with ``--test-shape`` the compile test's (B=2, Hq=4,
Hkv=2, L=300, S=500). How the float32 tile lists were chosen (benchmarks/results/*-triton-static-fp32.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import triton_aot

from fused_attention.kernels.triton.attention_configs import Tile


def _tile(text: str) -> Tile:
    block_m, rest = text.split("x")
    block_n, rest = rest.split("w")
    warps, stages = rest.split("s")
    return Tile(int(block_m), int(block_n), int(warps), int(stages))


def main(argv: list[str]) -> int:
    test_shape = "--test-shape" in argv
    arch, dtype, tf32, head_dim, features, pass_name, tiles = [a for a in argv if a != "--test-shape"]
    chosen = frozenset() if features == "plain" else frozenset(features.split(","))
    shape = {} if test_shape else {"batch": 2, "heads": 16, "kv_heads": 16, "seq_q": 4096, "seq_k": 4096}
    call = triton_aot.Call(dtype, tf32 == "1", int(head_dim), int(head_dim), chosen, **shape)
    for kernel, name, args in triton_aot.launches(call, int(arch)):
        if name != pass_name:
            continue
        for text in tiles.split(","):
            try:
                stats = triton_aot.stats(triton_aot.compile_launch(kernel, args, int(arch), _tile(text)))
            except Exception as error:  # noqa: BLE001  (a rejected tile is a line of the output)
                print(name, text, "error:", str(error).splitlines()[0][:150])
                continue
            print(name, text, "registers", stats.registers, "shared_kib", stats.shared // 1024, "spills",
                  stats.spill_stores, stats.spill_loads, "loops", [loop.instructions for loop in stats.loops])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
