"""Ours against torch's SDPA on the CPU at a few common shapes, for comparing instruction-set variants.

Run it once per variant, with both libraries held to the same instruction set, e.g. an AVX2 machine
simulated on an AVX-512 one:

    FUSED_ATTENTION_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/cpu_isa_variants.py
    FUSED_ATTENTION_CPU_ISA=baseline ATEN_CPU_CAPABILITY=default python benchmarks/cpu_isa_variants.py

Cases: forward (1, 8, 2048, 64), forward + backward (1, 8, 1024, 64), a BERT forward (8, 12, 128, 64),
a bfloat16 forward (1, 8, 1024, 64) and a decode step (1 query, 32 query heads over 8 KV heads, head dim
128, 4096 keys); float32 unless said; ours and torch alternate call by call; medians in ms.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fused_attention as fa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)

    q, k, v = (rand(1, 8, 2048, 64) for _ in range(3))
    qg, kg, vg = (rand(1, 8, 1024, 64, grad=True) for _ in range(3))
    do = rand(1, 8, 1024, 64)
    qb, kb, vb = (rand(8, 12, 128, 64) for _ in range(3))
    qh, kh, vh = (rand(1, 8, 1024, 64, dtype=torch.bfloat16) for _ in range(3))
    qd, kd, vd = rand(1, 32, 1, 128), rand(1, 8, 4096, 128), rand(1, 8, 4096, 128)
    cases = {
        "forward (1, 8, 2048, 64)": (lambda f: f(q, k, v), 7),
        "forward + backward (1, 8, 1024, 64)": (lambda f: torch.autograd.grad(f(qg, kg, vg), (qg, kg, vg), do), 7),
        "forward BERT (8, 12, 128, 64)": (lambda f: f(qb, kb, vb), 21),
        "forward bfloat16 (1, 8, 1024, 64)": (lambda f: f(qh, kh, vh), 9),
        "decode, S 4096, Hq 32, Hkv 8, D 128": (lambda f: f(qd, kd, vd, enable_gqa=True), 41),
    }
    print(f"variant {os.environ.get('FUSED_ATTENTION_CPU_ISA', 'best')} (ours: {fa._extension.load_extension().cpu_isa}), "
          f"torch {torch.__version__} ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'default')}, "
          f"{args.threads} threads\n")
    print("| case | ours (ms) | torch (ms) | torch / ours |\n|---|---|---|---|")
    for name, (call, reps) in cases.items():
        fns = [functools.partial(call, f) for f in (fa.scaled_dot_product_attention, F.scaled_dot_product_attention)]
        times: list[list[float]] = [[], []]
        for fn in fns:
            fn()
        for _ in range(reps):
            for fn, t in zip(fns, times):
                start = time.perf_counter()
                fn()
                t.append(time.perf_counter() - start)
        ours, theirs = (statistics.median(t) * 1e3 for t in times)
        print(f"| {name} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
