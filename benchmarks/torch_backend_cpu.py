"""The pure-PyTorch backend against torch's own SDPA on CPU: time (median) and peak RSS growth.

torch expresses ALiBi and sliding windows only as dense (L x S) masks; our torch backend computes them
per query chunk. Each row runs in a fresh subprocess, so its peak RSS growth (inputs, any dense mask,
outputs, gradients and workspace) is that call's own. "fwd" is inference (no grad).

    python benchmarks/torch_backend_cpu.py [--seq 2048] [--heads 8] [--dim 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch

_CHILD = r"""
import json, resource, sys
import torch, torch.utils.benchmark as tb
import fused_attention
from fused_attention.reference import visibility

provider, case, mode, b, h, n, d = sys.argv[1:8]
b, h, n, d = int(b), int(h), int(n), int(d)
grad = mode == "fwd+bwd"

def make_step(n):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, requires_grad=grad) for _ in range(3))
    slopes = torch.rand(h)
    kw, mask = {"is_causal": case == "causal"}, None
    if provider == "torch":  # torch expresses ALiBi and windows only as dense (H, L, S) / (L, S) masks
        if case == "alibi":
            mask = -slopes[:, None, None] * (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
        if case == "window":
            mask = visibility(n, n, window_size=(255, 0))
    elif case == "alibi":
        kw["alibi_slopes"] = slopes
    elif case == "window":
        kw["window_size"] = (255, 0)

    def step():
        if provider == "torch":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
        else:
            out = fused_attention.scaled_dot_product_attention(q, k, v, backend="torch", **kw)
        if grad:
            out.backward(torch.ones_like(out))

    return step

make_step(256)()  # warm up code paths and thread pools before the RSS baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step = make_step(n)  # the inputs (and a dense mask, for torch) count towards the peak
step()
peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
m = tb.Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=2.0)
print(json.dumps({"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times), "peak_mb": peak_mb}))
"""


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    shape = [str(args.batch), str(args.heads), str(args.seq), str(args.dim)]
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# B={args.batch} H={args.heads} L=S={args.seq} D={args.dim} float32; median of torch.utils.benchmark")
    print("| case | mode | torch SDPA (ms) | fused_attention[torch] (ms) | speedup | torch peak RSS (MB) | ours peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for case in ("plain", "causal", "alibi", "window"):
        for mode in ("fwd", "fwd+bwd"):
            t, o = (_run(provider, case, mode, *shape) for provider in ("torch", "fused_attention[torch]"))
            print(
                f"| {case} | {mode} | {t['median_s'] * 1e3:.1f} | {o['median_s'] * 1e3:.1f} | "
                f"{t['median_s'] / o['median_s']:.2f}x | {t['peak_mb']:.0f} | {o['peak_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
