"""The pure-PyTorch backend against torch's own SDPA on CPU: time (median) and peak RSS growth.

torch expresses ALiBi and sliding windows only as dense (L x S) masks; our torch backend computes them
per query chunk. Each measurement runs in a fresh subprocess so peak RSS is that call's own.

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
torch.manual_seed(0)
grad = mode == "fwd+bwd"
q, k, v = (torch.randn(b, h, n, d, requires_grad=grad) for _ in range(3))
slopes = torch.rand(h)

def call():
    if provider == "fused_attention[torch]":
        kw = {"is_causal": case == "causal"}
        if case == "alibi":
            kw["alibi_slopes"] = slopes
        if case == "window":
            kw["window_size"] = (255, 0)
        return fused_attention.scaled_dot_product_attention(q, k, v, backend="torch", **kw)
    mask = None
    if case == "alibi":  # torch needs the bias as a dense (H, L, S) float mask
        dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
        mask = -slopes[:, None, None] * dist
    if case == "window":
        mask = visibility(n, n, window_size=(255, 0))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case == "causal")

def step():
    out = call()
    if grad:
        out.backward(torch.ones_like(out))

step()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
timer = tb.Timer("step()", globals={"step": step})
m = timer.blocked_autorange(min_run_time=3.0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# peak includes the first (warm-up) call: RSS high-water mark since process start
print(json.dumps({"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times)}))
"""

_PEAK_CHILD = r"""
import json, resource, sys
exec(open(sys.argv[8]).read().split("step()\nbase")[0])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step()
print(json.dumps({"peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
"""


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
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
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_CHILD)
    for case in ("plain", "causal", "alibi", "window"):
        for mode in ("fwd", "fwd+bwd"):
            row = {}
            for provider in ("torch", "fused_attention[torch]"):
                timing = _run(_CHILD, provider, case, mode, *shape)
                peak = _run(_PEAK_CHILD, provider, case, mode, *shape, f.name)
                row[provider] = (timing["median_s"] * 1e3, peak["peak_growth_mb"])
            t, o = row["torch"], row["fused_attention[torch]"]
            print(f"| {case} | {mode} | {t[0]:.1f} | {o[0]:.1f} | {t[0] / o[0]:.2f}x | {t[1]:.0f} | {o[1]:.0f} |")


if __name__ == "__main__":
    main()
