"""MQA / GQA / MHA causal forward and forward+backward, B 1, Hq 8, L = S, D 64, float32: ours (cpu backend)
and torch's SDPA interleaved in one process, medians. python few_kv_heads_vs_torch.py L ROUNDS (tile-calls-and-packing.md)."""
import statistics as st
import sys
import time

import torch

import fused_attention as fa

torch.manual_seed(0)
torch.set_num_threads(2)
L=int(sys.argv[1]) if len(sys.argv)>1 else 2048
D=64
def mk(hkv):
    q=torch.randn(1,8,L,D,requires_grad=True); k=torch.randn(1,hkv,L,D,requires_grad=True); v=torch.randn(1,hkv,L,D,requires_grad=True)
    return q,k,v
res={}
cases={}
for hkv in (1,2,8):
    q,k,v=mk(hkv); do=torch.randn(1,8,L,D)
    def ours(q=q,k=k,v=v,do=do):
        o=fa.scaled_dot_product_attention(q,k,v,is_causal=True,enable_gqa=True,backend="cpu"); o.backward(do)
    def ref(q=q,k=k,v=v,do=do):
        o=torch.nn.functional.scaled_dot_product_attention(q,k,v,is_causal=True,enable_gqa=True); o.backward(do)
    def oursf(q=q,k=k,v=v):
        with torch.no_grad(): fa.scaled_dot_product_attention(q,k,v,is_causal=True,enable_gqa=True,backend="cpu")
    def reff(q=q,k=k,v=v):
        with torch.no_grad(): torch.nn.functional.scaled_dot_product_attention(q,k,v,is_causal=True,enable_gqa=True)
    cases[(hkv,'fb','ours')]=ours; cases[(hkv,'fb','torch')]=ref
    cases[(hkv,'f','ours')]=oursf; cases[(hkv,'f','torch')]=reff
for f in cases.values(): f()
times={k:[] for k in cases}
for r in range(int(sys.argv[2]) if len(sys.argv)>2 else 5):
    for key,f in cases.items():
        t=time.perf_counter(); f(); times[key].append(time.perf_counter()-t)
for hkv in (1,2,8):
  for p in ('f','fb'):
    o=st.median(times[(hkv,p,'ours')])*1e3; t=st.median(times[(hkv,p,'torch')])*1e3
    fl=4*8*L*L*D/2*(1 if p=='f' else 3.5)
    print(f"hkv={hkv} {p:2s} ours {o:7.1f} ms ({fl/o/1e6:5.0f} GF/s) torch {t:7.1f} ms ratio {t/o:.2f}x")
