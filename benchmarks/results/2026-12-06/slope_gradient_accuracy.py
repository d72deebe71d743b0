"""Float32 ALiBi slope gradients with sinks against the float32 reference (eleventh session's record,
alibi-slope-gradient.md). Run from the repository root: ``PYTHONPATH=$PWD python <this file> [seeds]``.

1. tests/test_sinks.py's ALiBi + causal case (B 2, Hq 4, L 37, S 53) on `seeds` seeds: how many fail
   DESIGN.md's policy, for the cpu and torch backends and for an emulation whose only float32 steps are
   the two matrix products (q k^T, dO v^T; the softmax, its backward and the sum in float64).
2. Longer rows (B 2, H 2, L = S = 2048, D 64, causal), 3 seeds: the slope gradient's relative error per
   head, the cpu backend against the float32 reference.
"""

import math
import sys

import torch

sys.path.insert(0, "tests")
import test_sinks as ts

import fused_attention
from fused_attention.reference import reference_attention


def slope_grad(fn, q, k, v, slopes, sinks, up, dtype, **kwargs):
    sl = slopes.detach().to(dtype).requires_grad_()
    out = fn(q.detach().to(dtype), k.detach().to(dtype), v.detach().to(dtype), alibi_slopes=sl,
             sinks=sinks.detach().to(dtype), **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return torch.autograd.grad(out, [sl], up.to(dtype))[0].double()


def emulated(q, k, v, slopes, sinks, up):
    """The slope gradient with float32 products and everything after them in float64."""
    L, S, E = q.shape[2], k.shape[2], q.shape[3]
    dist = (torch.arange(L)[:, None] + S - L - torch.arange(S)[None, :]).abs().double()
    visible = torch.arange(S)[None, :] <= torch.arange(L)[:, None]
    s = (q @ k.transpose(-1, -2)).double() / math.sqrt(E) - slopes.double()[None, :, None, None] * dist
    s = s.masked_fill(~visible, -math.inf)
    m = torch.maximum(s.amax(-1), sinks.double()[None, :, None])
    e, e_sink = (s - m[..., None]).exp(), (sinks.double()[None, :, None] - m).exp()
    p = e / (e.sum(-1) + e_sink)[..., None]
    dp = (up.float() @ v.transpose(-1, -2)).double()
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    return -(ds * dist).sum((0, 2, 3))


def backend(name):
    return lambda *a, **k: fused_attention.scaled_dot_product_attention(*a, backend=name, **k)


def policy_failures(seeds: int) -> None:
    fails = {"cpu": 0, "torch": 0, "emulated": 0}
    for seed in range(seeds):
        torch.manual_seed(seed)
        q, k, v, kw = ts._inputs({"alibi", "causal"})
        up = torch.randn(q.shape[:3] + (v.shape[3],), dtype=torch.float64)
        slopes, sinks = kw["alibi_slopes"], kw["sinks"]
        g64 = slope_grad(reference_attention, q, k, v, slopes, sinks, up, torch.float64, is_causal=True)
        bound = 3 * (slope_grad(reference_attention, q, k, v, slopes, sinks, up, torch.float32, is_causal=True)
                     - g64).abs().max().item() + 1e-6
        got = {name: slope_grad(backend(name), q, k, v, slopes, sinks, up, torch.float32, is_causal=True)
               for name in ("cpu", "torch")}
        got["emulated"] = emulated(q.detach(), k.detach(), v.detach(), slopes, sinks.detach(), up)
        for name, g in got.items():
            fails[name] += (g - g64).abs().max().item() > bound
    print(f"test_sinks' ALiBi + causal case, {seeds} seeds, policy failures: {fails}")


def long_rows() -> None:
    B, H, L, E = 2, 2, 2048, 64
    for with_sinks in (False, True):
        errors = {"cpu": [], "float32 reference": []}
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            q, k, v = (torch.randn(B, H, L, E, generator=g) for _ in range(3))
            slopes = torch.rand(H, generator=g) * 0.05 + 0.01
            sinks = 2 * torch.randn(H, generator=g) if with_sinks else torch.full((H,), -math.inf)
            up = torch.randn(B, H, L, E, generator=g, dtype=torch.float64)
            g64 = slope_grad(reference_attention, q, k, v, slopes, sinks, up, torch.float64, is_causal=True)
            for name, fn in (("cpu", backend("cpu")), ("float32 reference", reference_attention)):
                got = slope_grad(fn, q, k, v, slopes, sinks, up, torch.float32, is_causal=True)
                errors[name] += ((got - g64).abs() / g64.abs()).tolist()
        print(f"L = S = {L}, sinks {with_sinks}: " + ", ".join(
            f"{name} relative error mean {sum(e) / len(e):.2e} max {max(e):.2e}" for name, e in errors.items()))


if __name__ == "__main__":
    policy_failures(int(sys.argv[1]) if len(sys.argv) > 1 else 60)
    long_rows()
