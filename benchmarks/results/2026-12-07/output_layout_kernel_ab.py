"""In-process A/B of the cpu kernel alone, output contiguous (AB_CONTIGUOUS set) or in q's layout, q, k,
v viewed from a projection (needed the session's temporary build, as output_layout_call_ab.py; with the
code as committed both sides run the same code). usage: output_layout_kernel_ab.py [ROUNDS]"""
import os
import statistics
import sys

import torch
from torch.utils.benchmark import Timer

import fused_attention as fa

torch.manual_seed(0)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
CASES = [  # (name, B, H, Hkv, L, D, extra arguments)
    ("BERT 8x12x128x64", 8, 12, 12, 128, 64, {}),
    ("Gemma-2-like prefill 1x8/2x512x64, softcap 50, window 256", 1, 8, 2, 512, 64,
     {"softcap": 50.0, "window_size": (255, 0), "enable_gqa": True}),
    ("Llama-like prefill 1x8/2x2048x64 causal", 1, 8, 2, 2048, 64, {"is_causal": True, "enable_gqa": True}),
]
print("| call (float32, forward, kernel alone) | contiguous out (ms) | out in q's layout (ms) | speedup |")
print("|---|---|---|---|")
for name, b, h, hkv, n, d, extra in CASES:
    x = torch.randn(b, n, (h + 2 * hkv) * d)
    q, k, v = x.split([h * d, hkv * d, hkv * d], -1)
    q, k, v = (t.view(b, n, -1, d).transpose(1, 2) for t in (q, k, v))
    names = {"fa": fa, "q": q, "k": k, "v": v, "extra": extra}
    times = {"contiguous": [], "layout": []}
    for r in range(rounds):
        for key in ("contiguous", "layout") if r % 2 == 0 else ("layout", "contiguous"):
            if key == "contiguous":
                os.environ["AB_CONTIGUOUS"] = "1"
            else:
                os.environ.pop("AB_CONTIGUOUS", None)
            timer = Timer("fa.scaled_dot_product_attention(q, k, v, **extra)", globals=names, num_threads=2)
            times[key].append(timer.blocked_autorange(min_run_time=0.4).median * 1e3)
    os.environ.pop("AB_CONTIGUOUS", None)
    a, c = statistics.median(times["contiguous"]), statistics.median(times["layout"])
    print(f"| {name} | {a:.3f} | {c:.3f} | {a / c:.3f}x |")
