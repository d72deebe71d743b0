"""A forward of (B, H, L, D) = BxHxLxD, median ms of the calls of 1.5 s.
python tile_calls_forward_time.py BxHxLxD DTYPE THREADS (tile-calls-and-packing.md)."""
import statistics as st
import sys
import time

import torch

import fused_attention as fa

torch.set_num_threads(int(sys.argv[3]))
B,H,L,D=[int(x) for x in sys.argv[1].split("x")]
dt=getattr(torch,sys.argv[2])
q=torch.randn(B,H,L,D).to(dt); k=torch.randn(B,H,L,D).to(dt); v=torch.randn(B,H,L,D).to(dt)
for i in range(10): fa.scaled_dot_product_attention(q,k,v)
ts=[]
t0=time.time()
while time.time()-t0<1.5:
    t=time.perf_counter(); fa.scaled_dot_product_attention(q,k,v); ts.append(time.perf_counter()-t)
print(f"{st.median(ts)*1e3:.3f}")
