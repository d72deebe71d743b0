"""Positional-encoding kernels against the naive formulas and a plain copy, on CPU, in one run.

    python benchmarks/position_cpu.py [--backend cpu]

RoPE: x of shape (B=4, S=2048, H=16, D=128), layout bshd, float32, half-split, full rotary dim: the
fused kernel against the naive ``x * cos + rotate_half(x) * sin`` and against ``x.clone()``; q and k
in one call against cloning both. Sinusoidal: sequence-first x (2048, 4, 1024) against ``x.clone()``
and the classic ``x + pe[:S]``. Medians of ``torch.utils.benchmark`` (blocked_autorange).
"""

from __future__ import annotations

import argparse
import math
import platform

import torch
import torch.utils.benchmark as tb

import fused_attention


def _median_ms(fn) -> float:
    fn()
    return tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median * 1e3


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="force a backend (default: automatic)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (torch.utils.benchmark syncs CUDA)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_default_device(args.device)
    b, s, h, d = 4, 2048, 16, 128
    x = torch.randn(b, s, h, d)
    k = torch.randn(b, s, h, d)
    cos, sin = fused_attention.rotary_cos_sin(s, d, device=args.device)
    cos_full = torch.cat((cos, cos), -1)[None, :, None, :]
    sin_full = torch.cat((sin, sin), -1)[None, :, None, :]
    rows = {
        "rope: fused apply_rotary_emb": lambda: fused_attention.apply_rotary_emb(
            x, cos, sin, layout="bshd", backend=args.backend
        ),
        "rope: naive x*cos + rotate_half(x)*sin": lambda: x * cos_full + _rotate_half(x) * sin_full,
        "rope: x.clone()": lambda: x.clone(),
        "rope qk: fused apply_rotary_emb_qk": lambda: fused_attention.apply_rotary_emb_qk(
            x, k, cos, sin, layout="bshd", backend=args.backend
        ),
        "rope qk: q.clone(), k.clone()": lambda: (x.clone(), k.clone()),
    }
    seq = torch.randn(2048, 4, 1024)
    position = torch.arange(5000).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, 1024, 2) * (-math.log(10000.0) / 1024))
    pe = torch.zeros(5000, 1, 1024)
    pe[:, 0, 0::2] = torch.sin(position * div_term)
    pe[:, 0, 1::2] = torch.cos(position * div_term)
    rows |= {
        "sinusoidal: fused add_sinusoidal_position_encoding": lambda: fused_attention.add_sinusoidal_position_encoding(
            seq, backend=args.backend
        ),
        "sinusoidal: classic x + pe[:S]": lambda: seq + pe[: seq.size(0)],
        "sinusoidal: x.clone()": lambda: seq.clone(),
    }
    times = {name: _median_ms(fn) for name, fn in rows.items()}
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"backend {args.backend or 'automatic'}, device {args.device}")
    print("| kernel | median (ms) | vs copy |")
    print("|---|---|---|")
    copies = {"rope qk": "rope qk: q.clone(), k.clone()", "rope": "rope: x.clone()", "sinusoidal": "sinusoidal: x.clone()"}
    for name, ms in times.items():
        family = name.split(":")[0]
        print(f"| {name} | {ms:.2f} | {ms / times[copies[family]]:.2f}x |")
    naive, fused = times["rope: naive x*cos + rotate_half(x)*sin"], times["rope: fused apply_rotary_emb"]
    print(f"\nfused RoPE is {naive / fused:.2f}x faster than the naive formula; fused sinusoidal is "
          f"{times['sinusoidal: classic x + pe[:S]'] / times['sinusoidal: fused add_sinusoidal_position_encoding']:.2f}x "
          "faster than the classic add")


if __name__ == "__main__":
    main()
