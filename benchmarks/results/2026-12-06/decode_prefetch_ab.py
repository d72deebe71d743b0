"""A decode step's GB/s of K + V next to a float32 torch.sum over as many bytes, alternated in one process
(cpu-decode-l1-prefetch.md). Run it under two builds in alternating processes to compare them:

    PYTHONPATH=TREE ROUNDS=3 python decode_prefetch_ab.py DTYPE S [L]   (LAYOUT=bhsd|bshd|paged, PAGE=16)
"""
import os
import statistics
import sys
import time

import torch

import fused_attention as fa

torch.set_num_threads(int(os.environ.get("NT", "2")))
dtype = getattr(torch, sys.argv[1]); seq = int(sys.argv[2]); lq = int(sys.argv[3]) if len(sys.argv) > 3 else 1
rounds = int(os.environ.get("ROUNDS", "7"))
layout = os.environ.get("LAYOUT", "bhsd")
g = torch.Generator().manual_seed(0)
q = torch.randn(1, 32, lq, 128, generator=g).to(dtype)
k, v = (torch.randn(1, 8, seq, 128, generator=g).to(dtype) for _ in range(2))
kk = torch.ones(2 * k.numel() * k.element_size() // 4)
kw = {"window_size": (-1, 0)} if lq > 1 else {}
if layout == "bhsd":
    def ours(): fa.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="cpu", **kw)
else:
    qb, kb, vb = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    if layout == "paged":
        page = int(os.environ.get("PAGE", "16")); pages = seq // page
        perm = torch.randperm(pages, generator=g)
        kp, vp = (x[0].reshape(pages, page, 8, 128)[perm.argsort()].contiguous() for x in (kb, vb))
        table = perm.to(torch.int32).unsqueeze(0)
        def ours(): fa.attention_with_kvcache(qb, kp, vp, block_table=table, is_causal=lq > 1, backend="cpu")
    else:
        def ours(): fa.attention_with_kvcache(qb, kb, vb, is_causal=lq > 1, backend="cpu")
def summ(): kk.sum()
def med(fn, t=0.4):
    fn(); ts = []; end = time.perf_counter() + t
    while time.perf_counter() < end:
        a = time.perf_counter(); fn(); ts.append(time.perf_counter() - a)
    return statistics.median(ts)
res = {"sum": [], "ours": []}
gb = 2 * k.numel() * k.element_size() / 1e9
for r in range(rounds):
    res["sum"].append(med(summ))
    res["ours"].append(med(ours))
s = statistics.median(res["sum"])
print(f"{sys.argv[1]} S={seq} L={lq} {layout}: sum {gb/s:.1f} GB/s | " + " | ".join(
    f"{n} {gb/statistics.median(t):.1f} ({s/statistics.median(t):.0%})" for n, t in res.items() if n != "sum"), flush=True)
