"""In-process A/B of the vectorized K^T packing: needs a temporary build whose load_transposed_panels
skips transpose16x16 while FA_T16_OFF_NOW is "1" (read per call when FA_NO_T16 is set; not in the
code). python transpose16_inprocess_ab.py THREADS (tile-calls-and-packing.md)."""
import os
import statistics as st
import sys
import time

import torch

os.environ["FA_NO_T16"]="1"; os.environ["FA_T16_OFF_NOW"]="0"
import fused_attention as fa

torch.set_num_threads(int(sys.argv[1]))
res={}
for shape,dt in (("8x12x128x64",torch.float32),("8x12x128x64",torch.bfloat16),("4x16x256x128",torch.float32),("1x8x2048x64",torch.float32)):
    B,H,L,D=[int(x) for x in shape.split("x")]
    q,k,v=(torch.randn(B,H,L,D).to(dt) for _ in range(3))
    f=lambda q=q, k=k, v=v: fa.scaled_dot_product_attention(q,k,v)
    for i in range(5): f()
    ts={"on":[],"off":[]}
    for r in range(30):
        for mode in ("on","off"):
            os.environ["FA_T16_OFF_NOW"]="1" if mode=="off" else "0"
            t0=time.perf_counter()
            for i in range(5): f()
            ts[mode].append((time.perf_counter()-t0)/5)
    on,off=st.median(ts["on"]),st.median(ts["off"])
    print(shape, dt, f"on {on*1e3:.3f} ms off {off*1e3:.3f} ms off/on {off/on:.3f}")
