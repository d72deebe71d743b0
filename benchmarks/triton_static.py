"""Static cost of the Triton attention kernels, read from their SASS: no GPU needed.

For each kernel the launchers start for a call (forward, and with ``--passes`` the backward passes),
each tile dispatch can launch for it (the autotune candidates of that architecture), on sm_80 and sm_90:
registers, shared memory, spill stores/loads (static ``STL``/``LDL`` count, whole kernel), SASS
instructions of each inner loop (one iteration: a key tile in the forward), and which matrix
instructions the loops run (``HGMMA``: wgmma; ``HMMA``: mma.sync). Compiled by ``tools/triton_aot.py``
with the specialization Triton's JIT applies at run time.

    python benchmarks/triton_static.py [--sweep default|full] [--passes forward backward_dq backward_dkdv]
                                       [--jobs N] [--out benchmarks/results/DATE-triton-static]

Shapes: B=2, Hq=16, Hkv=16 (GQA: 4), L=S=4096 (varlen: 2 sequences packed, 8192 tokens). The default
sweep is a subset (``--sweep full`` is the whole product, hours on 2 cores): every feature at
bf16/D=128 on sm_90; plain, causal, dropout, softcap and ALiBi at bf16/D=128 on sm_80; fp16/D=64 plain
and causal with dropout, and fp32 (IEEE and TF32) D=128 plain, on both; bf16 D=64 and 256 plain on sm_90. Forward loops are listed in code order: the window's left-edge tiles (masked; window only),
the interior tiles (no checks), the whole masked tiles (diagonal, window right edge), then the ragged
last tile (key rows loaded under a bound).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import os
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import triton_aot

FEATURE_SETS = {
    "plain": (), "causal": ("causal",), "window": ("window",), "alibi": ("alibi",), "softcap": ("softcap",),
    "key_lengths": ("key_lengths",), "dropout": ("dropout",), "bool_mask": ("bool_mask",),
    "float_mask": ("float_mask",), "mask_grad": ("float_mask", "mask_grad"), "gqa": ("gqa",),
    "varlen": ("varlen",), "causal_dropout": ("causal", "dropout"),
}
DTYPES = {"fp16": ("float16", False), "bf16": ("bfloat16", False), "fp32": ("float32", False),
          "tf32": ("float32", True)}


def _call(dtype: str, head_dim: int, feature: str) -> triton_aot.Call:
    name, tf32 = DTYPES[dtype]
    features = frozenset(FEATURE_SETS[feature])
    kv_heads = 4 if feature == "gqa" else 16
    if feature == "varlen":
        return triton_aot.Call(name, tf32, head_dim, head_dim, features, batch=2, heads=16, kv_heads=kv_heads,
                               seq_q=8192, seq_k=8192)
    return triton_aot.Call(name, tf32, head_dim, head_dim, features, batch=2, heads=16, kv_heads=kv_heads,
                           seq_q=4096, seq_k=4096)


def jobs(sweep: str) -> list[tuple[int, str, int, str]]:
    """``(arch, dtype, head dim, feature set)`` to compile."""
    if sweep == "full":
        return list(itertools.product((80, 90), DTYPES, (64, 128, 256), FEATURE_SETS))
    out = [(90, "bf16", 128, feature) for feature in FEATURE_SETS]
    out += [(80, "bf16", 128, feature) for feature in ("plain", "causal", "dropout", "softcap", "alibi")]
    out += [(arch, "fp16", 64, feature) for arch in (80, 90) for feature in ("plain", "causal_dropout")]
    out += [(arch, dtype, 128, "plain") for arch in (80, 90) for dtype in ("fp32", "tf32")]
    out += [(90, "bf16", d, "plain") for d in (64, 256)]
    return out


FIELDS = ("arch", "dtype", "head_dim", "feature", "kernel", "tile", "registers", "shared_kib", "spill_stores",
          "spill_loads", "loop_instructions", "loop_mma", "error")


def run_job(job: tuple[tuple[int, str, int, str], tuple[str, ...]]) -> list[dict]:
    (arch, dtype, head_dim, feature), passes = job
    call = _call(dtype, head_dim, feature)
    rows = []
    for kernel, pass_name, args in triton_aot.launches(call, arch):
        if pass_name not in passes:
            continue
        for tile in triton_aot.tiles_for(pass_name, args, arch):
            row = {"arch": f"sm_{arch}", "dtype": dtype, "head_dim": head_dim, "feature": feature,
                   "kernel": kernel.__name__.removeprefix("attention_").removesuffix("_kernel"),
                   "tile": f"{tile.block_m}x{tile.block_n} w{tile.num_warps} s{tile.num_stages}"}
            try:
                stats = triton_aot.stats(triton_aot.compile_launch(kernel, args, arch, tile))
            except Exception as error:  # noqa: BLE001  (a rejected config is a row of the table)
                rows.append(row | {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"})
                continue
            row |= {
                "registers": stats.registers, "shared_kib": round(stats.shared / 1024, 1),
                "spill_stores": stats.spill_stores, "spill_loads": stats.spill_loads,
                "loop_instructions": " / ".join(str(loop.instructions) for loop in stats.loops),
                "loop_mma": " / ".join("wgmma" if loop.wgmma and not loop.mma_sync else
                                       "mma.sync" if loop.mma_sync and not loop.wgmma else
                                       "both" if loop.mma_sync else "none" for loop in stats.loops),
                "error": "",
            }
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=("default", "full"), default="default")
    parser.add_argument("--passes", nargs="+", default=["forward"],
                        choices=("forward", "backward_dq", "backward_dkdv"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", nargs="*", default=None, help="feature sets to keep (default: all)")
    parser.add_argument("--archs", nargs="*", type=int, default=None, help="architectures to keep (80, 90)")
    parser.add_argument("--dtypes", nargs="*", default=None, help="dtypes to keep (fp16 bf16 fp32 tf32)")
    parser.add_argument("--head-dims", nargs="*", type=int, default=None, help="head dims to keep")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" /
                                             f"{datetime.date.today()}-triton-static"))
    args = parser.parse_args()
    filters = (args.archs, args.dtypes, args.head_dims, args.only)
    todo = [j for j in jobs(args.sweep) if all(f is None or v in f for v, f in zip(j, filters))]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = [row for rows in pool.map(run_job, [(j, tuple(args.passes)) for j in todo]) for row in rows]
    import torch
    import triton

    out = Path(args.out)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in FIELDS} for row in rows)
    header = (f"# Triton attention, static SASS statistics ({datetime.date.today()})\n\n"
              f"Command: `python benchmarks/triton_static.py {' '.join(sys.argv[1:])}`  \n"
              f"Compiled on {platform.machine()} without a GPU: triton {triton.__version__}, torch "
              f"{torch.__version__}. Spills: static STL/LDL counts in the whole kernel. Loops: SASS "
              f"instructions per iteration of each innermost loop, in code order (forward: [window left "
              f"edge /] interior / masked whole tiles / ragged last tile).\n\n")
    lines = ["| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in FIELDS) + " |" for row in rows]
    out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
