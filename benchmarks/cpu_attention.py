"""The ``cpu`` backend (C++ kernels) against torch's CPU SDPA: the ratios of the CPU kernel issue.

Forward (float32 and bfloat16) and forward+backward (float32) at (B, H, L=S, D) in {(1, 8, 2048, 64),
(1, 8, 4096, 64), (1, 16, 2048, 128)}, causal and not; then at L = S = 16384 (H=8, D=64) our plain,
ALiBi and 256-wide window forward times, with peak RSS growth of each in a fresh process.

With ``--shapes``, the shape-range table instead (the shapes models run): decode steps (B = 1, Hq = 32,
Hkv = 8, D = 128, L = 1 and L = 8 bottom-right causal against S = 4096, 16384, 32768, float32 and
bfloat16) in GB/s of K + V read, next to a ``torch.sum`` over the same bytes read as float32
(``fused_attention.bench.roofline.read_bytes``: the memory's read rate) and torch's SDPA
(``enable_gqa=True``; its L = 8 mask is a bool ``attn_mask``, as its ``is_causal`` is top-left); then
short and medium sequences (B, H, L=S, D) in {(8, 12, 128, 64), (32, 12, 128, 64), (1, 12, 128, 64),
(8, 12, 512, 64), (4, 16, 256, 128)}, forward and forward+backward, float32 and bfloat16, plain,
right-padded (``key_lengths``; torch: a bool mask) and causal, as ratios against torch's SDPA; then MQA
and GQA forward+backward (B = 1, Hq = 8, Hkv = 1 and 2, L = S = 2048, causal, float32).

The long rows also give our useful GFLOP/s as a share of a float32 2048^3 ``torch.mm`` timed beside each
row (the limit a kernel made of tile products can approach).

Timing: ``torch.utils.benchmark`` medians; torch and ours alternate ``--rounds`` times and each side
keeps the median of its rounds, so load that comes and goes on a shared machine hits both alike.

    python benchmarks/cpu_attention.py [--rounds 3] [--out FILE.md]
    python benchmarks/cpu_attention.py --shapes [--rounds 3] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

import fused_attention
from fused_attention import _extension
from fused_attention.bench import attention_flops
from fused_attention.bench.report import cpu_model
from fused_attention.bench.roofline import read_bytes
from fused_attention.bench.timing import time_cpu

SHAPES = [(1, 8, 2048, 64), (1, 8, 4096, 64), (1, 16, 2048, 128)]


def _median_ms(fn, min_run_time: float) -> float:
    return time_cpu(fn, min_run_time, warmup=False)[0] * 1e3  # with torch's threads (Timer's default: 1)


def _inputs(shape, dtype, requires_grad):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).to(dtype).requires_grad_(requires_grad) for _ in range(3)]


def _call(fn, q, k, v, causal, backward):
    def run():
        out = fn(q, k, v, causal)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def _torch(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _ours(q, k, v, causal):
    return fused_attention.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu")


# The compute-bound rows' yardstick: a float32 matrix product of this size, timed beside each case.
SGEMM_N = 2048


def compare(rounds: int, min_run_time: float) -> list[dict]:
    rows = []
    a, b = torch.randn(SGEMM_N, SGEMM_N), torch.randn(SGEMM_N, SGEMM_N)

    def sgemm():
        torch.mm(a, b)

    cases = [(dt, "fwd") for dt in (torch.float32, torch.bfloat16)] + [(torch.float32, "fwd+bwd")]
    for dtype, mode in cases:
        for shape in SHAPES:
            for causal in (False, True):
                backward = mode == "fwd+bwd"
                q, k, v = _inputs(shape, dtype, backward)
                ms = _interleaved({"torch": _call(_torch, q, k, v, causal, backward),
                                   "ours": _call(_ours, q, k, v, causal, backward), "sgemm": sgemm}, rounds,
                                  min_run_time)
                t, o = ms["torch"], ms["ours"]
                b, h, n, d = shape
                ours_gflops = attention_flops(b, h, n, n, d, causal=causal, mode=mode) / o / 1e6
                sgemm_gflops = 2 * SGEMM_N**3 / ms["sgemm"] / 1e6
                rows.append({"dtype": str(dtype).removeprefix("torch."), "mode": mode, "shape": shape,
                             "causal": causal, "torch_ms": t, "ours_ms": o, "speedup": t / o,
                             "ours_gflops": ours_gflops, "sgemm_gflops": sgemm_gflops,
                             "of_sgemm": ours_gflops / sgemm_gflops})
                print(_row_line(rows[-1]), flush=True)
    return rows


_RSS_SCRIPT = r"""
import json, sys
import torch, fused_attention

def peak_rss():  # this process's peak (ru_maxrss would start at the parent's: Linux keeps it across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
kind = sys.argv[1]
q, k, v = (torch.randn(1, 8, 256, 64) for _ in range(3))
fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu")  # load kernels and thread pools
q, k, v = (torch.randn(1, 8, 16384, 64) for _ in range(3))
kwargs = {"plain": {}, "alibi": {"alibi_slopes": torch.full((8,), 0.05)}, "window": {"window_size": (255, 0)}}[kind]
base = peak_rss()
out = fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu", **kwargs)
print(json.dumps({"growth_mb": (peak_rss() - base) / 2**20}))
"""


def long_sequences(rounds: int, min_run_time: float) -> list[dict]:
    q, k, v = _inputs((1, 8, 16384, 64), torch.float32, False)
    kinds = {"plain": {}, "alibi": {"alibi_slopes": torch.full((8,), 0.05)}, "window": {"window_size": (255, 0)}}
    # the cases alternate (a call takes seconds: one timed call per case and round)
    ms = _interleaved({kind: lambda kw=kwargs: fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)
                       for kind, kwargs in kinds.items()}, rounds, min_run_time)
    rows = []
    for kind in kinds:
        proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, kind], capture_output=True, text=True, check=True)
        rows.append({"case": kind, "ms": ms[kind], "peak_rss_growth_mb": json.loads(proc.stdout)["growth_mb"]})
        print(rows[-1], flush=True)
    return rows


DECODE_SEQS = (4096, 16384, 32768)
SHORT_SHAPES = [(8, 12, 128, 64), (32, 12, 128, 64), (1, 12, 128, 64), (8, 12, 512, 64), (4, 16, 256, 128)]


def _interleaved(fns: dict, rounds: int, min_run_time: float) -> dict[str, float]:
    """Median ms of each function over ``rounds`` alternations (each a ``blocked_autorange`` median)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_median_ms(fn, min_run_time))
    return {name: statistics.median(t) for name, t in times.items()}


def decode_rows(rounds: int, min_run_time: float) -> list[dict]:
    """GB/s of K + V read by a decode step: torch.sum over the same bytes (as float32), ours, torch's SDPA."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for lq in (1, 8):
            for seq in DECODE_SEQS:
                gen = torch.Generator().manual_seed(seq + lq)
                q = torch.randn(1, 32, lq, 128, generator=gen).to(dtype)
                k, v = (torch.randn(1, 8, seq, 128, generator=gen).to(dtype) for _ in range(2))
                # L = 8: speculative decoding, query i at key position seq - 8 + i (bottom-right causal).
                ours_kw = {"window_size": (-1, 0)} if lq > 1 else {}
                mask = torch.ones(lq, seq, dtype=torch.bool).tril(seq - lq) if lq > 1 else None
                fns = {
                    "sum": read_bytes(k, v),
                    "ours": lambda q=q, k=k, v=v, kw=ours_kw: fused_attention.scaled_dot_product_attention(
                        q, k, v, enable_gqa=True, backend="cpu", **kw),
                    "torch": lambda q=q, k=k, v=v, m=mask: F.scaled_dot_product_attention(
                        q, k, v, attn_mask=m, enable_gqa=True),
                }
                ms = _interleaved(fns, rounds, min_run_time)
                gb = 2 * k.numel() * k.element_size() / 1e9
                row = {"dtype": str(dtype).removeprefix("torch."), "lq": lq, "seq": seq,
                       **{f"{name}_gbs": gb / (t / 1e3) for name, t in ms.items()}}
                row["of_sum"] = row["ours_gbs"] / row["sum_gbs"]
                row["vs_torch"] = row["ours_gbs"] / row["torch_gbs"]
                rows.append(row)
                print(_decode_line(row), flush=True)
    return rows


def _decode_line(r: dict) -> str:
    return (f"| {r['dtype']} | {r['lq']}{' causal' if r['lq'] > 1 else ''} | {r['seq']} | {r['sum_gbs']:.1f} | "
            f"{r['ours_gbs']:.1f} | {r['torch_gbs']:.1f} | {r['of_sum']:.0%} | {r['vs_torch']:.2f}x |")


def _timed_pair(q, k, v, ours_kw: dict, torch_kw: dict, backward: bool) -> dict:
    """Ours and torch's SDPA on the same inputs, as callables (a forward, or a forward and a backward)."""
    def run(fn, kw):
        def call():
            out = fn(q, k, v, **kw)
            if backward:
                out.backward(torch.ones_like(out))
        return call
    return {"torch": run(F.scaled_dot_product_attention, torch_kw),
            "ours": run(fused_attention.scaled_dot_product_attention, {"backend": "cpu", **ours_kw})}


def short_rows(rounds: int, min_run_time: float) -> list[dict]:
    """Short and medium sequences, forward and forward+backward: plain, right-padded and causal, ours vs
    torch's SDPA."""
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for dtype in (torch.float32, torch.bfloat16):
            for shape in SHORT_SHAPES:
                q, k, v = _inputs(shape, dtype, mode == "fwd+bwd")
                b, _, n, _ = shape
                lengths = torch.tensor([n - (i * n) // (2 * b) for i in range(b)])  # from n down to about n / 2
                pad_mask = (torch.arange(n) < lengths[:, None])[:, None, None, :]
                cases = {
                    "plain": ({}, {}),
                    "key_lengths": ({"key_lengths": lengths}, {"attn_mask": pad_mask}),
                    "causal": ({"is_causal": True}, {"is_causal": True}),
                }
                for case, (ours_kw, torch_kw) in cases.items():
                    ms = _interleaved(_timed_pair(q, k, v, ours_kw, torch_kw, mode == "fwd+bwd"), rounds, min_run_time)
                    rows.append({"dtype": str(dtype).removeprefix("torch."), "mode": mode, "shape": shape,
                                 "case": case, "torch_ms": ms["torch"], "ours_ms": ms["ours"],
                                 "speedup": ms["torch"] / ms["ours"]})
                    print(_short_line(rows[-1]), flush=True)
    return rows


def _short_line(r: dict) -> str:
    b, h, n, d = r["shape"]
    return (f"| {r['dtype']} | {r['mode']} | {b}x{h}x{n}x{d} | {r['case']} | {r['torch_ms']:.3f} | "
            f"{r['ours_ms']:.3f} | {r['speedup']:.2f}x |")


def few_kv_head_rows(rounds: int, min_run_time: float) -> list[dict]:
    """MQA and GQA forward+backward, B = 1, Hq = 8, Hkv = 1 and 2, L = S = 2048, causal, float32."""
    rows = []
    for hkv in (1, 2):
        gen = torch.Generator().manual_seed(hkv)
        q = torch.randn(1, 8, 2048, 64, generator=gen).requires_grad_()
        k, v = (torch.randn(1, hkv, 2048, 64, generator=gen).requires_grad_() for _ in range(2))
        kw = {"is_causal": True, "enable_gqa": True}
        ms = _interleaved(_timed_pair(q, k, v, kw, kw, True), rounds, min_run_time)
        rows.append({"hkv": hkv, "torch_ms": ms["torch"], "ours_ms": ms["ours"], "speedup": ms["torch"] / ms["ours"]})
        print(_few_line(rows[-1]), flush=True)
    return rows


def _few_line(r: dict) -> str:
    return f"| 8 / {r['hkv']} | {r['torch_ms']:.1f} | {r['ours_ms']:.1f} | {r['speedup']:.2f}x |"


def shapes_report(decode: list[dict], short: list[dict], few: list[dict], args) -> str:
    lines = [
        _header(),
        (f"Command: python benchmarks/cpu_attention.py --shapes --rounds {args.rounds} "
         f"--min-run-time {args.min_run_time}"),
        "",
        "Decode, B = 1, Hq = 32, Hkv = 8, D = 128: GB/s of K + V read (torch.sum: the same bytes, read as float32)",
        "",
        "| dtype | L | S | torch.sum | ours | torch SDPA | ours / sum | ours / torch |",
        "|---|---|---|---|---|---|---|---|",
        *(_decode_line(r) for r in decode),
        "",
        "Short and medium sequences (B x H x L=S x D); key_lengths: right padding from L down to about L / 2",
        "(torch: the same as a bool mask)",
        "",
        "| dtype | mode | shape | case | torch SDPA (ms) | ours (ms) | speedup |",
        "|---|---|---|---|---|---|---|",
        *(_short_line(r) for r in short),
        "",
    ]
    for mode in ("fwd", "fwd+bwd"):
        for dtype in ("float32", "bfloat16"):
            ratios = [r["speedup"] for r in short if r["dtype"] == dtype and r["mode"] == mode]
            if ratios:
                lines.append(f"- {dtype} {mode}: median speedup {statistics.median(ratios):.2f}x, "
                             f"min {min(ratios):.2f}x")
    if few:
        lines += ["", "Few KV heads, forward+backward, B = 1, Hq = 8, L = S = 2048, D = 64, causal, float32", "",
                  "| Hq / Hkv | torch SDPA (ms) | ours (ms) | speedup |", "|---|---|---|---|",
                  *(_few_line(r) for r in few)]
    return "\n".join(lines) + "\n"


def _header() -> str:
    return (
        f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), fused_attention {fused_attention.__version__}, "
        f"CPU kernels: {_extension.load_extension().cpu_isa}; load: {os.getloadavg()[0]:.2f} (1 min)"
    )


def _row_line(r: dict) -> str:
    b, h, n, d = r["shape"]
    return (f"| {r['dtype']} | {r['mode']} | {b}x{h}x{n}x{d} | {'yes' if r['causal'] else 'no'} | "
            f"{r['torch_ms']:.1f} | {r['ours_ms']:.1f} | {r['speedup']:.2f}x | {r['ours_gflops']:.0f} | "
            f"{r['sgemm_gflops']:.0f} | {r['of_sgemm']:.0%} |")


def report(rows: list[dict], long_rows: list[dict], args) -> str:
    lines = [
        (
            f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), fused_attention {fused_attention.__version__}, "
            f"CPU kernels: {_extension.load_extension().cpu_isa}"
        ),
        f"Command: python benchmarks/cpu_attention.py --rounds {args.rounds} --min-run-time {args.min_run_time}",
        "",
        (f"Useful GFLOP/s: 4 B H L S D per forward, halved when causal, backward 2.5x the forward; sgemm: a "
         f"float32 {SGEMM_N}^3 torch.mm timed beside each row (its median GFLOP/s)."),
        "",
        ("| dtype | mode | B x H x L=S x D | causal | torch SDPA (ms) | ours (ms) | speedup | ours GFLOP/s | "
         "sgemm GFLOP/s | of sgemm |"),
        "|---|---|---|---|---|---|---|---|---|---|",
        *(_row_line(r) for r in rows),
        "",
    ]
    for dtype, mode in (("float32", "fwd"), ("bfloat16", "fwd"), ("float32", "fwd+bwd")):
        ratios = [r["speedup"] for r in rows if r["dtype"] == dtype and r["mode"] == mode]
        if ratios:
            lines.append(f"- {dtype} {mode}: median speedup {statistics.median(ratios):.2f}x, min {min(ratios):.2f}x")
    for mode, causal in (("fwd", False), ("fwd", True), ("fwd+bwd", False), ("fwd+bwd", True)):
        shares = [r["of_sgemm"] for r in rows if r["dtype"] == "float32" and r["mode"] == mode and r["causal"] == causal]
        if shares:
            lines.append(f"- float32 {mode}{' causal' if causal else ''}: {min(shares):.0%}-{max(shares):.0%} "
                         f"of the sgemm rate")
    if long_rows:
        plain = next(r["ms"] for r in long_rows if r["case"] == "plain")
        lines += ["", "L = S = 16384, H = 8, D = 64, float32 forward (ours):", "",
                  "| case | ms | vs our plain | peak RSS growth (MB) |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['ms']:.0f} | {r['ms'] / plain:.3f}x | {r['peak_rss_growth_mb']:.0f} |"
                  for r in long_rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of torch and ours per case")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per blocked_autorange")
    parser.add_argument("--skip-long", action="store_true", help="leave out the L = 16384 cases")
    parser.add_argument("--shapes", action="store_true", help="the shape-range table (decode, short sequences)")
    parser.add_argument("--skip-decode", action="store_true", help="with --shapes: leave out the decode rows")
    parser.add_argument("--out", help="also write the markdown report here")
    args = parser.parse_args()
    if fused_attention.backends.BACKENDS["cpu"].unavailable_reason():
        raise SystemExit(f"cpu backend unavailable: {fused_attention.backends.BACKENDS['cpu'].unavailable_reason()}")
    if args.shapes:
        decode = [] if args.skip_decode else decode_rows(args.rounds, args.min_run_time)
        short = short_rows(args.rounds, args.min_run_time)
        text = shapes_report(decode, short, few_kv_head_rows(args.rounds, args.min_run_time), args)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return
    rows = compare(args.rounds, args.min_run_time)
    long_rows = [] if args.skip_long else long_sequences(args.rounds, args.min_run_time)
    text = report(rows, long_rows, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
