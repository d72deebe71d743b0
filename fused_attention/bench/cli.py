"""``python -m fused_attention bench``: a sweep from flags or the ``--quick`` preset, printed as a
markdown table, optionally written as CSV and JSON."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from . import report
from .providers import default_providers
from .runner import run
from .spec import MODES, OPS, sweep

# --quick: under a minute on a 2-core CPU, still plain, causal and ALiBi at two lengths, both modes.
QUICK = {
    "ops": ["plain", "causal", "alibi"],
    "seq": [256, 512],
    "batch": [1],
    "heads": [4],
    "dim": [64],
    "dtype": ["float32"],
    "modes": ["fwd", "fwd+bwd"],
    "min_run_time": 0.1,
}
DEFAULT = {
    "ops": list(OPS),
    "seq": [512, 1024, 2048],
    "batch": [1],
    "heads": [8],
    "dim": [64],
    "dtype": None,
    "modes": ["fwd", "fwd+bwd"],
    "min_run_time": 0.2,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small preset: plain/causal/alibi, L=S in {256, 512}, B=1 H=4 D=64 float32",
    )
    parser.add_argument("--ops", nargs="+", choices=OPS, help=f"attention ops (default: all of {OPS})")
    parser.add_argument("--seq", nargs="+", type=int, help="sequence lengths, L = S")
    parser.add_argument("--batch", nargs="+", type=int)
    parser.add_argument("--heads", nargs="+", type=int)
    parser.add_argument("--dim", nargs="+", type=int, help="head dims")
    parser.add_argument(
        "--dtype", nargs="+", help="float32, bfloat16, float16 (default float32 on the CPU, bfloat16 on CUDA)"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES)
    parser.add_argument("--providers", nargs="+", help="only these providers (default: all)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--min-run-time", type=float, help="seconds of timed runs per row")
    parser.add_argument("--out", help="directory for bench.csv and bench.json")


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    preset = QUICK if args.quick else DEFAULT
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def pick(name: str) -> list:
        value = getattr(args, name)
        return value if value is not None else preset[name]

    dtypes = pick("dtype") or (["bfloat16"] if torch.device(device).type == "cuda" else ["float32"])
    try:
        specs = sweep(
            pick("ops"),
            pick("seq"),
            batches=pick("batch"),
            heads=pick("heads"),
            dims=pick("dim"),
            dtypes=dtypes,
            modes=pick("modes"),
            device=device,
        )
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    providers = default_providers(device)
    if args.providers:
        known = {p.name for p in providers}
        unknown = sorted(set(args.providers) - known)
        if unknown:
            print(f"bench: unknown providers {unknown}; available: {sorted(known)}", file=sys.stderr)
            return 2
        providers = [p for p in providers if p.name in args.providers]

    argv = sys.argv[1:] if argv is None else argv
    meta = report.machine(device)
    meta["command"] = "python -m fused_attention " + shlex.join(argv)
    min_run_time = args.min_run_time if args.min_run_time is not None else preset["min_run_time"]
    print(report.header_text(meta))
    print(
        f"{len(specs)} problems x {len(providers)} providers ({', '.join(p.name for p in providers)})",
        flush=True,
    )
    start = time.perf_counter()
    done = [0]
    total = len(specs) * len(providers)

    interactive = sys.stderr.isatty()

    def progress(row: object) -> None:
        done[0] += 1
        print(f"\r  {done[0]}/{total}", end="" if done[0] < total else "\n", file=sys.stderr, flush=True)

    rows = run(specs, providers, min_run_time=min_run_time, progress=progress if interactive else None)
    elapsed = time.perf_counter() - start
    meta["elapsed_s"] = round(elapsed, 2)
    print()
    print(report.markdown(rows))
    print(
        f"\n{len(rows)} rows in {elapsed:.1f} s; speedup = torch-sdpa median / row median (same run); "
        "max err = max |out - float64 reference|"
    )
    if args.out:
        for path in report.write(rows, meta, args.out):
            print(f"wrote {path}")
    return 0
