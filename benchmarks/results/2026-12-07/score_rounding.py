"""Rounding of float32 dot products at head dim 128: torch's products and ours, in ulps of the exact value
(float32-large-scale-sweep.md). Run: PYTHONPATH=. python benchmarks/results/2026-12-07/score_rounding.py"""

import torch

import fused_attention as fa

torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
N, D = 400, 128
q, k = torch.randn(N, D, generator=gen), torch.randn(N, D, generator=gen)
exact = (q.double() * k.double()).sum(-1)


def ulps(x: torch.Tensor) -> torch.Tensor:
    return torch.finfo(torch.float32).eps * 2.0 ** torch.floor(torch.log2(x.abs()))


def report(name: str, s: torch.Tensor) -> None:
    e = (s.double() - exact).abs() / ulps(exact.float()).double()
    print(f"{name:28s} mean {e.mean():.3f} ulp, p99 {e.quantile(0.99):.2f}, max {e.max():.2f}")


def ours(rows: int) -> torch.Tensor:
    """Our lse of `rows` copies of query i against key i alone at scale 1: the score itself."""
    lse = []
    for i in range(N):
        qi = q[i].view(1, 1, 1, D).expand(1, 1, rows, D).contiguous()
        ki = k[i].view(1, 1, 1, D)
        lse.append(fa.scaled_dot_product_attention(qi, ki, ki, scale=1.0, backend="cpu", return_lse=True)[1][..., 0])
    return torch.stack(lse).flatten()


report("torch mm 1x128 @ 128x1", torch.stack([q[i : i + 1] @ k[i : i + 1].T for i in range(N)]).flatten())
report("torch mm NxD @ DxN diag", torch.diagonal(q @ k.T))
report("torch (q*k).sum", (q * k).sum(-1))
report("ours L=1 S=1 (decode)", ours(1))
report("ours L=40 S=1 (blocked)", ours(40))
