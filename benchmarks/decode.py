"""Decode-step attention over a KV cache: GB/s of K+V read by ``attention_with_kvcache`` (contiguous and
paged caches) against ``torch.sum`` over the same bytes read as float32 (the measured read bandwidth:
``fused_attention.bench.roofline.read_bytes``) and torch's SDPA
(``enable_gqa``) on the contiguous cache, all timed interleaved in one process (medians).

    python benchmarks/decode.py [--seq 1024 4096 16384 32768] [--page-size 16] [--reps 15] [--dtype float32]

Shapes: batch 1, Lq = 1, Hq = 32, Hkv = 8, D = 128, the cache full up to ``seq`` (paged: shuffled pages).
Bytes counted: K and V of the visible keys, once. Each of the four reads its own copy of the bytes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import fused_attention as fa
from fused_attention.bench.roofline import read_bytes


def _median_times(fns: dict[str, callable], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _row(seq: int, hq: int, hkv: int, dim: int, page: int, dtype: torch.dtype, reps: int, backend: str | None) -> None:
    gen = torch.Generator().manual_seed(seq)
    q = torch.randn(1, 1, hq, dim, generator=gen).to(dtype)
    k = torch.randn(1, seq, hkv, dim, generator=gen).to(dtype)
    v = torch.randn(1, seq, hkv, dim, generator=gen).to(dtype)
    pages = -(-seq // page)
    perm = torch.randperm(pages, generator=gen)
    k_pages = torch.zeros(pages, page, hkv, dim, dtype=dtype)
    v_pages = torch.zeros_like(k_pages)
    k_pages.view(-1, hkv, dim)[: seq].copy_(k[0])  # logical order, then scatter to shuffled pages
    v_pages.view(-1, hkv, dim)[: seq].copy_(v[0])
    k_pages, v_pages = k_pages[perm.argsort()], v_pages[perm.argsort()]
    table = perm.to(torch.int32).unsqueeze(0)  # logical page i lives at physical page perm[i]
    lengths = torch.tensor([seq], dtype=torch.int32)
    # Each provider reads its own copy of the bytes, so that between two calls of one, the same three
    # other caches' worth of bytes pass through the caches: a sum over the contiguous cache itself had
    # left it in L3 for the contiguous call that followed, and made paged caches look 1.3-1.5x slower
    # than contiguous ones where the two take the same time in turn (2026-12-05, cpu-decode-widen.md).
    kh, vh, qh = k.clone().transpose(1, 2), v.clone().transpose(1, 2), q.transpose(1, 2)
    fns = {
        "sum": read_bytes(k.clone(), v.clone()),
        "contiguous": lambda: fa.attention_with_kvcache(q, k, v, cache_seqlens=lengths, backend=backend),
        "paged": lambda: fa.attention_with_kvcache(
            q, k_pages, v_pages, cache_seqlens=lengths, block_table=table, backend=backend
        ),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True),
    }
    contiguous = fns["contiguous"]()
    assert torch.allclose(fns["paged"](), contiguous, atol=1e-5, rtol=1e-4), "paged != contiguous"
    t = _median_times(fns, reps)
    gb = 2 * k.numel() * k.element_size() / 1e9
    print(f"| {seq} | {gb / t['sum']:.1f} | {gb / t['contiguous']:.1f} | {gb / t['paged']:.1f} | "
          f"{gb / t['sdpa']:.1f} | {t['paged'] / t['contiguous']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", nargs="+", type=int, default=[1024, 4096, 16384, 32768])
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    hq, hkv, dim, page = 32, 8, 128, args.page_size
    print(f"# decode: B=1 Lq=1 Hq={hq} Hkv={hkv} D={dim} {args.dtype}, page {page}; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f} at start")
    print("| S | read (sum) GB/s | contiguous GB/s | paged GB/s | torch SDPA GB/s | paged / contiguous time |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for seq in args.seq:
            _row(seq, hq, hkv, dim, page, dtype, args.reps, args.backend)
    print(f"# load {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
