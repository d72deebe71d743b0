"""One decode step (B 1, 32 / 8 heads, D 128, one query row), median us of the calls of 2 s.
python tile_calls_decode_time.py DTYPE S THREADS (tile-calls-and-packing.md)."""
import statistics as st
import sys
import time

import torch

import fused_attention as fa

torch.set_num_threads(int(sys.argv[3]))
dtype=getattr(torch,sys.argv[1]); S=int(sys.argv[2])
q=torch.randn(1,32,1,128).to(dtype); k=torch.randn(1,8,S,128).to(dtype); v=torch.randn(1,8,S,128).to(dtype)
f=lambda: fa.scaled_dot_product_attention(q,k,v,enable_gqa=True)
for i in range(5): f()
ts=[]
t0=time.perf_counter()
while time.perf_counter()-t0<2:
    t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
print(f"{st.median(ts)*1e6:.1f}")
