"""Worst tolerance-policy ratio (error / bound, DESIGN.md) of the cpu backend's float32 output and lse over
six seeds, 122 query rows against few keys (cpu-few-keys.md).

    PYTHONPATH=$PWD:$PWD/tests python benchmarks/results/2026-12-06/few_keys_accuracy.py
"""

import torch
from conftest import rand

import fused_attention as fa
from fused_attention.reference import reference_attention


def ratio(out, ref_dt, ref64):
    return (out.double() - ref64).abs().max().item() / (2 * (ref_dt.double() - ref64).abs().max().item() + 1e-6)


for dim in (128, 64):
    for keys in (1, 2, 4, 15, 16, 17, 33, 64, 300):
        worst_lse = worst_out = 0.0
        for seed in range(6):
            gen = torch.Generator().manual_seed(seed)
            q = rand(2, 2, 122, dim, gen=gen)
            k, v = rand(2, 2, keys, dim, gen=gen), rand(2, 2, keys, dim, gen=gen)
            out, lse = fa.scaled_dot_product_attention(q, k, v, backend="cpu", return_lse=True)
            out32, lse32 = reference_attention(q, k, v)
            out64, lse64 = reference_attention(q.double(), k.double(), v.double())
            worst_lse = max(worst_lse, ratio(lse, lse32, lse64))
            worst_out = max(worst_out, ratio(out, out32, out64))
        print(f"D {dim} S {keys}: worst lse / bound {worst_lse:.2f}, output / bound {worst_out:.2f}")
