"""Backward (and forward) of causal GQA attention, B 1, Hq 8, L = S, D 64, on the cpu backend: prints the
median-ish (3rd of 15) ms and useful GFLOP/s. python tile_calls_backward_time.py HKV L THREADS
(tile-calls-and-packing.md; run with PYTHONPATH at a package copy holding the build to time)."""
import sys
import time

import torch

import fused_attention as fa

torch.set_num_threads(int(sys.argv[3]))
L=int(sys.argv[2]); D=64; hkv=int(sys.argv[1])
q=torch.randn(1,8,L,D,requires_grad=True); k=torch.randn(1,hkv,L,D,requires_grad=True); v=torch.randn(1,hkv,L,D,requires_grad=True)
do=torch.randn(1,8,L,D)
o=fa.scaled_dot_product_attention(q,k,v,is_causal=True,enable_gqa=True,backend="cpu")
for i in range(3): torch.autograd.grad(o,(q,k,v),do,retain_graph=True)
ts=[]
for i in range(15):
    t=time.perf_counter(); torch.autograd.grad(o,(q,k,v),do,retain_graph=True); ts.append(time.perf_counter()-t)
ts.sort(); b=ts[2]; fl=2.5*4*8*L*L*D/2
with torch.no_grad():
    fs=[]
    for i in range(15):
        t=time.perf_counter(); fa.scaled_dot_product_attention(q,k,v,is_causal=True,enable_gqa=True,backend="cpu"); fs.append(time.perf_counter()-t)
fs.sort(); f=fs[2]
print(f"bwd {b*1e3:.1f} ms {fl/b/1e9:.0f} GF/s (useful); fwd {f*1e3:.1f} ms {fl/2.5/f/1e9:.0f} GF/s")
