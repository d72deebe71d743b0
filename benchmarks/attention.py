"""Attention through the ``fused_attention.bench`` API: every available backend of ours against torch's
SDPA backends, FlexAttention (where torch has it; its compile is the warm-up), FlashAttention and
xformers (CUDA, when installed) and the naive formula, on the ops torch expresses natively and those it
needs a dense mask for. Each row: median and spread, TFLOP/s, roofline fraction, speedup against
torch's SDPA in the same run, errors against the float64 reference, peak memory.

    python benchmarks/attention.py [--device cpu] [--seq 512 1024 2048] [--ops plain causal alibi window]
        [--out benchmarks/results/DATE-attention-cpu]
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
    parser.add_argument("--ops", nargs="+", choices=bench.ATTENTION_OPS, default=["plain", "causal", "alibi", "window"])
    parser.add_argument("--seq", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--modes", nargs="+", choices=bench.MODES, default=["fwd", "fwd+bwd"])
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timed runs per row")
    parser.add_argument("--out", help="directory for CSV, JSON, markdown and PNG plots")
    args = parser.parse_args()
    dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    specs = bench.sweep(
        args.ops, args.seq, heads=[args.heads], dims=[args.dim], dtypes=[dtype], modes=args.modes, device=args.device
    )
    run_session(
        specs,
        bench.default_providers(args.device),
        device=args.device,
        command="python " + shlex.join(sys.argv),
        out=args.out,
        min_run_time=args.min_run_time,
    )


if __name__ == "__main__":
    main()
