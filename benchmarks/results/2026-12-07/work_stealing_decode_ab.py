"""In-process A/B of stealing on a decode step (needed the session's temporary build, which read
FA_NO_STEAL at each call). usage: work_stealing_decode_ab.py DTYPE L S [bhsd|bshd] [ROUNDS]"""
import os
import statistics
import sys
import time

import torch

import fused_attention as fa

dt = getattr(torch, sys.argv[1])
L, S = int(sys.argv[2]), int(sys.argv[3])
layout = sys.argv[4] if len(sys.argv) > 4 else "bhsd"
torch.manual_seed(0)
if layout == "bhsd":
    q, k, v = torch.randn(1, 32, L, 128, dtype=dt), torch.randn(1, 8, S, 128, dtype=dt), torch.randn(1, 8, S, 128, dtype=dt)
else:
    q, k, v = torch.randn(1, L, 32, 128, dtype=dt), torch.randn(1, S, 8, 128, dtype=dt), torch.randn(1, S, 8, 128, dtype=dt)


def f():
    return fa.attention_with_kvcache(q, k, v, is_causal=L > 1, layout=layout, backend="cpu")


f()
res = {"steal": [], "static": []}
for _ in range(int(sys.argv[5]) if len(sys.argv) > 5 else 40):
    for mode in ("steal", "static"):
        if mode == "static":
            os.environ["FA_NO_STEAL"] = "1"
        else:
            os.environ.pop("FA_NO_STEAL", None)
        t = time.perf_counter()
        for _ in range(5):
            f()
        res[mode].append((time.perf_counter() - t) / 5 * 1e3)
a, b = statistics.median(res["steal"]), statistics.median(res["static"])
print(sys.argv[1:5], f"steal {a:.3f} static {b:.3f}  static/steal {b / a:.3f}")
