"""A tiny paged decode step through ``attention_with_kvcache`` (B 4, 8 heads, D 64, pages of 16, one new
token), median of 7 x 500 calls on one thread: the cost of the argument checks. ``python
kvcache_check_overhead.py <tree>``, alternating the trees to compare."""

import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
import fused_attention as fa

torch.set_num_threads(1)
batch, heads, dim, page, pages = 4, 8, 64, 16, 64
k_cache, v_cache = torch.randn(pages, page, heads, dim), torch.randn(pages, page, heads, dim)
table = torch.arange(pages, dtype=torch.int32).view(batch, -1)
lengths = torch.tensor([100, 120, 90, 50], dtype=torch.int32)
q, k, v = (torch.randn(batch, 1, heads, dim) for _ in range(3))


def step():
    return fa.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, block_table=table)


for _ in range(200):
    step()
times = []
for _ in range(7):
    start = time.perf_counter()
    for _ in range(500):
        step()
    times.append((time.perf_counter() - start) / 500)
times.sort()
print(sys.argv[1], f"{times[3] * 1e6:.1f} us per call")
