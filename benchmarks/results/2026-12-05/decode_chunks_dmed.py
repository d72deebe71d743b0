"""One decode step timed alone (cpu-decode-chunks.md): median ms of calls repeated for 2 s.

python decode_chunks_dmed.py DTYPE S L THREADS [bhsd|bshd|paged]: B 1, Hq 32, Hkv 8, D 128; L > 1 is
bottom-right causal; bshd and paged (pages of 16, shuffled) go through attention_with_kvcache.
"""

import statistics
import sys
import time

import torch

import fused_attention as fa

torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2)
dtype = getattr(torch, sys.argv[1])
seq, lq = int(sys.argv[2]), int(sys.argv[3])
layout = sys.argv[5] if len(sys.argv) > 5 else "bhsd"
gen = torch.Generator().manual_seed(0)
q = torch.randn(1, 32, lq, 128, generator=gen).to(dtype)
k, v = (torch.randn(1, 8, seq, 128, generator=gen).to(dtype) for _ in range(2))
kw = {"window_size": (-1, 0)} if lq > 1 else {}
if layout == "bhsd":
    def call():
        return fa.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="cpu", **kw)
else:
    qb, kb, vb = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    if layout == "paged":
        page, pages = 16, seq // 16
        perm = torch.randperm(pages, generator=gen)
        kp, vp = (x[0].reshape(pages, page, 8, 128)[perm.argsort()].contiguous() for x in (kb, vb))
        table = perm.to(torch.int32).unsqueeze(0)

        def call():
            return fa.attention_with_kvcache(qb, kp, vp, block_table=table, is_causal=lq > 1, backend="cpu")
    else:
        def call():
            return fa.attention_with_kvcache(qb, kb, vb, is_causal=lq > 1, backend="cpu")
call()
call()
times = []
end = time.perf_counter() + 2
while time.perf_counter() < end:
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
print(f"{statistics.median(times) * 1e3:.3f}")
