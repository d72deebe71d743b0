"""Record script (2026-12-07): time and minor page faults a call of the cpu forward, 10 calls each."""

import resource
import time

import torch

import fused_attention

for heads, d, lq, keys in ((4, 128, 32, 1024), (8, 128, 32, 1024), (32, 128, 32, 1024), (32, 64, 32, 1024),
                           (12, 64, 128, 128)):
    b = 1 if lq == 32 else 8
    q = torch.randn(b, heads, lq, d)
    k, v = (torch.randn(b, heads, keys, d) for _ in range(2))
    fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu")
    before, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(10):
        fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu")
    elapsed, faults = (time.perf_counter() - t) / 10, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
    print(f"H={heads} D={d} L={lq} S={keys}: {elapsed * 1e3:.2f} ms, {faults:.0f} minor faults per call")
