"""Record script (2026-12-07): few query rows against a long cache, ours vs torch's SDPA.

B 1, 32 query / HKV kv heads, head dim 128, bottom-right causal (ours: window_size=(-1, 0); torch: the same
bool mask, enable_gqa=True), interleaved rounds, medians.
Usage: python decode_wide_vs_torch.py DTYPE KEYS L1,L2,... ROUNDS [HKV]
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fused_attention

dtype = getattr(torch, sys.argv[1])
keys, rounds = int(sys.argv[2]), int(sys.argv[4])
hkv = int(sys.argv[5]) if len(sys.argv) > 5 else 8
torch.manual_seed(0)
for lq in map(int, sys.argv[3].split(",")):
    q = torch.randn(1, 32, lq, 128, dtype=dtype)
    k, v = (torch.randn(1, hkv, keys, 128, dtype=dtype) for _ in range(2))
    mask = torch.ones(lq, keys, dtype=torch.bool).tril(keys - lq)
    fns = {
        "ours": lambda q=q, k=k, v=v: fused_attention.scaled_dot_product_attention(
            q, k, v, enable_gqa=True, backend="cpu", window_size=(-1, 0)),
        "torch": lambda q=q, k=k, v=v, mask=mask: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True),
    }
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    flops = 32 * lq * keys * 128 * 4
    print(f"{dtype} L={lq} S={keys} Hkv={hkv}: ours {med['ours'] * 1e3:.2f} ms ({flops / med['ours'] / 1e9:.0f} GFLOP/s), "
          f"torch {med['torch'] * 1e3:.2f} ms ({flops / med['torch'] / 1e9:.0f}), ratio {med['torch'] / med['ours']:.2f}x")
