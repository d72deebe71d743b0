"""Forward times of ours (cpu backend) and torch's SDPA at a few shapes, alternating call by call.

    PYTHONPATH=<build> python amx_ab.py [bfloat16|float32]

Record: cpu-amx.md (run once per build, builds alternating by process).
"""

import statistics
import sys
import time

import torch

import fused_attention as fa

torch.set_num_threads(2)
DT = getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.bfloat16
SHAPES = [(8, 12, 128, 64), (8, 12, 512, 64), (4, 16, 256, 128), (1, 8, 2048, 64), (1, 8, 4096, 128)]

for B, H, L, D in SHAPES:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(DT) for _ in range(3))
    for causal in (False, True):
        def ours(q=q, k=k, v=v, causal=causal):
            return fa.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu")

        def theirs(q=q, k=k, v=v, causal=causal):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        ours(), theirs()
        a, b = [], []
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end or len(a) < 3:
            s = time.perf_counter()
            ours()
            a.append(time.perf_counter() - s)
            s = time.perf_counter()
            theirs()
            b.append(time.perf_counter() - s)
        mine, torch_ms = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        name = f"{(B, H, L, D)} {'causal' if causal else 'plain'}"
        print(f"{name:32s} ours {mine:8.3f} ms  torch {torch_ms:8.3f} ms  ratio {torch_ms / mine:5.2f}x")
