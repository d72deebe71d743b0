"""Positional-encoding kernels through the ``fused_attention.bench`` API: each of our position backends
on the device (not interpreted Triton on the CPU) against the naive formulas, RoPE's
``x * cos + rotate_half(x) * sin`` and the classic sinusoidal ``x + pe[:L]``, in GB/s (minimum bytes
moved), with the copy-bandwidth roofline, errors against float64 and peak memory.

    python benchmarks/position.py [--device cpu] [--seq 1024 2048 4096] [--out DIR]

RoPE on x (B, H, L, D); sinusoidal on x (B, L, H * D); default B=4, H=16, D=128.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from fused_attention import bench
from fused_attention.bench.session import run_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq", nargs="+", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", nargs="+", choices=bench.spec.DTYPES, default=None)
    parser.add_argument("--modes", nargs="+", choices=bench.MODES, default=["fwd", "fwd+bwd"])
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timed runs per row")
    parser.add_argument("--out", help="directory for CSV, JSON, markdown and PNG plots")
    args = parser.parse_args()
    dtypes = args.dtype or (["bfloat16"] if torch.device(args.device).type == "cuda" else ["float32"])
    specs = bench.sweep(
        bench.POSITION_OPS, args.seq, batches=[args.batch], heads=[args.heads], dims=[args.dim], dtypes=dtypes,
        modes=args.modes, device=args.device,
    )
    providers = bench.default_providers(args.device, quick=True)  # quick: no interpreted Triton on the CPU
    run_session(
        specs, providers, device=args.device, command="python " + shlex.join(sys.argv), out=args.out,
        min_run_time=args.min_run_time,
    )


if __name__ == "__main__":
    main()
