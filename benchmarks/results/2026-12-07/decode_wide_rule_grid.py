"""Record script (2026-12-07): one call's median time for each case, for comparing the two forwards.

Cases B x Hq x Hkv x L x S (head dim 128 where Hq = 32, else 64), bottom-right causal. The record ran it
twice per case list under a temporary build switch (not committed) that moved decode_serves' bound.
Usage: python decode_wide_rule_grid.py DTYPE ROUNDS CASE,CASE,...
"""

import statistics
import sys
import time

import torch

import fused_attention

dtype, rounds = getattr(torch, sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
for case in sys.argv[3].split(","):
    b, hq, hkv, lq, keys = map(int, case.split("x"))
    d = 128 if hq == 32 else 64
    q = torch.randn(b, hq, lq, d, dtype=dtype)
    k, v = (torch.randn(b, hkv, keys, d, dtype=dtype) for _ in range(2))

    def call(q=q, k=k, v=v):
        return fused_attention.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="cpu",
                                                            window_size=(-1, 0))

    call()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    print(f"{case}: {statistics.median(times) * 1e3:.3f} ms")
