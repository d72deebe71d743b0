"""In-process A/B of stealing on scaled_dot_product_attention (needed the session's temporary build, which
read FA_NO_STEAL at each call). usage: work_stealing_attention_ab.py B H HKV L D fwd|fwdbwd causal|plain
DTYPE [CALLS_PER_ROUND] [ROUNDS]"""
import os
import statistics
import sys
import time

import torch

import fused_attention as fa

B, H, Hkv, L, D = map(int, sys.argv[1:6])
mode, causal, dt = sys.argv[6], sys.argv[7] == "causal", getattr(torch, sys.argv[8])
grad = mode == "fwdbwd"
torch.manual_seed(0)
q = torch.randn(B, H, L, D, dtype=dt, requires_grad=grad)
k, v = (torch.randn(B, Hkv, L, D, dtype=dt, requires_grad=grad) for _ in range(2))
g = torch.randn(B, H, L, D, dtype=dt)


def f():
    o = fa.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hkv != H, backend="cpu")
    if grad:
        torch.autograd.grad(o, (q, k, v), g)


f()
res = {"steal": [], "static": []}
reps = int(sys.argv[9]) if len(sys.argv) > 9 else 3
for _ in range(int(sys.argv[10]) if len(sys.argv) > 10 else 20):
    for m in ("steal", "static"):
        if m == "static":
            os.environ["FA_NO_STEAL"] = "1"
        else:
            os.environ.pop("FA_NO_STEAL", None)
        t = time.perf_counter()
        for _ in range(reps):
            f()
        res[m].append((time.perf_counter() - t) / reps * 1e3)
a, b = statistics.median(res["steal"]), statistics.median(res["static"])
print(sys.argv[1:9], f"steal {a:.3f} static {b:.3f}  static/steal {b / a:.3f}")
