"""A/B of the bfloat16 decode paths (cpu-decode-amx.md): run it with FUSED_ATTENTION_CPU_ISA=avx512bf16 and
with =amx in alternating processes (the variable is read once per process).

    python decode_amx_ab.py bfloat16 1,2,8,16 4096,16384,32768

Prints one JSON line: for each "L/S", GB/s of K + V read by our step and by a torch.sum over the same
tensors (medians of 11 interleaved calls, 2 threads).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

import fused_attention as fa


def main() -> None:
    torch.set_num_threads(2)
    dtype = getattr(torch, sys.argv[1])
    lqs = [int(x) for x in sys.argv[2].split(",")]
    seqs = [int(x) for x in sys.argv[3].split(",")]
    result = {}
    for seq in seqs:
        gen = torch.Generator().manual_seed(seq)
        k, v = (torch.randn(1, 8, seq, 128, generator=gen).to(dtype) for _ in range(2))
        gb = 2 * k.numel() * k.element_size() / 1e9
        for lq in lqs:
            q = torch.randn(1, 32, lq, 128, generator=gen).to(dtype)
            kw = {"window_size": (-1, 0)} if lq > 1 else {}
            fns = {
                "sum": lambda k=k, v=v: (k.sum(), v.sum()),
                "ours": lambda q=q, k=k, v=v, kw=kw: fa.scaled_dot_product_attention(
                    q, k, v, enable_gqa=True, backend="cpu", **kw),
            }
            times: dict[str, list[float]] = {name: [] for name in fns}
            for fn in fns.values():
                fn()
            for _ in range(11):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            result[f"{lq}/{seq}"] = {name: gb / statistics.median(t) for name, t in times.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
