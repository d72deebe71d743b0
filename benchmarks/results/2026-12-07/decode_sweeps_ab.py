"""Alternating processes of two builds (package copies under /tmp/s24/A, /tmp/s24/E, each with its own _C .so)
running decode_sweeps_drive.py; prints each side's median GB/s and the median of the per-round ratios.

    python decode_sweeps_ab.py ROUNDS "float32 32768 paged 30 1,bfloat16 4096 contig 200 1" A,E
"""
import os
import re
import statistics
import subprocess
import sys

cases = [c.split() for c in sys.argv[2].split(",")]
rounds = int(sys.argv[1]); variants = sys.argv[3].split(",") if len(sys.argv) > 3 else ["A", "B"]
env = dict(os.environ, FUSED_ATTENTION_SKIP_CUDA_BUILD="1")
res = {}
for r in range(rounds):
    for c in cases:
        for x in (variants if r % 2 == 0 else variants[::-1]):
            out = subprocess.run(["/work/main/.venv/bin/python", "/work/main/benchmarks/results/2026-12-07/decode_sweeps_drive.py", *c], env=dict(env, PYTHONPATH=f"/tmp/s24/{x}"), capture_output=True, text=True, check=True).stdout
            gb = float(re.search(r"ms ([\d.]+) GB/s", out).group(1))
            res.setdefault(" ".join(c), {}).setdefault(x, []).append(gb)
for c, d in res.items():
    base = d[variants[0]]
    s = f"{c:32s} " + " ".join(f"{x} {statistics.median(d[x]):5.1f}" for x in variants)
    for x in variants[1:]:
        s += f" | {x}/{variants[0]} median ratio {statistics.median(b / a for a, b in zip(base, d[x])):.3f} (" + ", ".join(f"{b / a:.2f}" for a, b in zip(base, d[x])) + ")"
    print(s, flush=True)
