"""Decode-step driver for the sweep A/B (decode-sweeps.md): one process, one build (PYTHONPATH picks the
package copy), attention_with_kvcache on (1, S, 8, 128) caches, 32 query heads, Lq rows (bottom-right causal
when > 1); four copies of the cache in turn so that each call reads from memory at S = 32768.

    python decode_sweeps_drive.py DTYPE S contig|paged|sum CALLS [LQ]
"""
import sys
import time

import torch

import fused_attention as fa

dtype = getattr(torch, sys.argv[1]); seq = int(sys.argv[2]); paged = sys.argv[3] == "paged"; n = int(sys.argv[4])
hq, hkv, dim, page = 32, 8, 128, 16
lq = int(sys.argv[5]) if len(sys.argv) > 5 else 1
g = torch.Generator().manual_seed(0)
q = torch.randn(1, lq, hq, dim, generator=g).to(dtype)
K = [torch.randn(1, seq, hkv, dim, generator=g).to(dtype) for _ in range(4)]
V = [torch.randn(1, seq, hkv, dim, generator=g).to(dtype) for _ in range(4)]
k = K[0]
lengths = torch.tensor([seq], dtype=torch.int32)
if sys.argv[3] == "sum":
    F = [torch.cat([a.reshape(-1), b.reshape(-1)]).view(torch.float32) if dtype != torch.float32 else torch.cat([a.reshape(-1), b.reshape(-1)]) for a, b in zip(K, V)]
    it = [0]
    def f():
        i = it[0] = (it[0] + 1) % 4
        return F[i].sum()
elif paged:
    pages = seq // page; perm = torch.randperm(pages, generator=g)
    KP = [x[0].reshape(pages, page, hkv, dim)[perm.argsort()].contiguous() for x in K]; VP = [x[0].reshape(pages, page, hkv, dim)[perm.argsort()].contiguous() for x in V]
    table = perm.to(torch.int32).unsqueeze(0)
    it = [0]
    def f():
        i = it[0] = (it[0] + 1) % 4
        return fa.attention_with_kvcache(q, KP[i], VP[i], cache_seqlens=lengths, block_table=table, is_causal=lq > 1)
else:
    it = [0]
    def f():
        i = it[0] = (it[0] + 1) % 4
        return fa.attention_with_kvcache(q, K[i], V[i], cache_seqlens=lengths, is_causal=lq > 1)
f()
ts = []
for _ in range(n):
    t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
ts.sort(); gb = 2 * k.numel() * k.element_size() / 1e9
print(f"{sys.argv[1:4]} median {ts[len(ts)//2]*1e3:.2f} ms {gb/ts[len(ts)//2]:.1f} GB/s best {gb/ts[0]:.1f}")
