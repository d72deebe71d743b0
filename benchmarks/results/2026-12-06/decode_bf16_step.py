"""One bfloat16 decode step on the cpu backend, timed (cpu-decode-bf16-pairs.md). Run with the tree to time
on the path: ``PYTHONPATH=<tree> python decode_bf16_step.py S [threads [calls [L]]]``. B 1, Hq 32, Hkv 8,
D 128; L > 1 rows see the cache and the rows before them (``window_size=(-1, 0)``)."""

import sys
import time

import torch

import fused_attention as fa

S = int(sys.argv[1])
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
calls = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
L = int(sys.argv[4]) if len(sys.argv) > 4 else 1
q = torch.randn(1, 32, L, 128, dtype=torch.bfloat16)
k, v = (torch.randn(1, 8, S, 128, dtype=torch.bfloat16) for _ in range(2))


def step():
    return fa.scaled_dot_product_attention(q, k, v, enable_gqa=True, window_size=(-1, 0) if L > 1 else None,
                                           backend="cpu")


for _ in range(20):
    step()
start = time.perf_counter()
for _ in range(calls):
    step()
seconds = (time.perf_counter() - start) / calls
print(f"L {L} S {S} {seconds * 1e6:.1f} us  {2 * k.numel() * 2 / seconds / 1e9:.1f} GB/s of K and V")
