"""A/B of attention_with_kvcache's host cost: one process per build (PYTHONPATH picks the package copy), the
calls below interleaved, medians of wall time per call. Run it alternating the two builds' processes:

    PYTHONPATH=<build> python kvcache_short_path_ab.py [--threads 2] [--calls 300] [--rounds 7]

Cases (B 1, float32 unless named): the call_overhead.py decode step (Hq 8, Hkv 2, D 64, 600 cached keys,
append one token) with RoPE fused and without, contiguous (B, H, S, D) and paged (B, S, H, D) in pages of 16;
and issue 15's shape (Hq 32, Hkv 8, D 128) read without an append over S = 16, 1024 and 4096 keys in both
layouts, float32 and bfloat16. Every call appends into the same slot, so each repeats the same work.
"""
import argparse
import statistics
import time

import torch

import fused_attention as fa

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--calls", type=int, default=300)
parser.add_argument("--rounds", type=int, default=7)
args = parser.parse_args()
torch.set_num_threads(args.threads)
g = torch.Generator().manual_seed(0)


def step_cases():
    filled, capacity, page = 600, 1024, 16
    q, k, v = (torch.randn(1, h, 1, 64, generator=g) for h in (8, 2, 2))
    kc, vc = torch.randn(1, 2, capacity, 64, generator=g), torch.randn(1, 2, capacity, 64, generator=g)
    table = torch.arange(capacity // page, dtype=torch.int32).unsqueeze(0)
    kp = kc[0].transpose(0, 1).reshape(capacity // page, page, 2, 64).contiguous()  # (pages, page, H, D)
    vp = vc[0].transpose(0, 1).reshape(capacity // page, page, 2, 64).contiguous()
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    cos, sin = fa.rotary_cos_sin(capacity, 64)
    lengths = torch.tensor([filled], dtype=torch.int32)
    rope = {"rotary_cos": cos, "rotary_sin": sin}
    return {
        "step 600 keys, RoPE, bhsd contiguous": lambda: fa.attention_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=lengths, layout="bhsd", **rope),
        "step 600 keys, RoPE, bshd pages of 16": lambda: fa.attention_with_kvcache(
            qs, kp, vp, ks, vs, cache_seqlens=lengths, block_table=table, **rope),
        "step 600 keys, bhsd contiguous": lambda: fa.attention_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=lengths, layout="bhsd"),
        "step 600 keys, bshd pages of 16": lambda: fa.attention_with_kvcache(
            qs, kp, vp, ks, vs, cache_seqlens=lengths, block_table=table),
    }


def read_cases():
    cases = {}
    for dtype in (torch.float32, torch.bfloat16):
        for seq in (16, 1024, 4096):
            q = torch.randn(1, 1, 32, 128, generator=g).to(dtype)
            k, v = (torch.randn(1, seq, 8, 128, generator=g).to(dtype) for _ in range(2))
            qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            name = f"read {seq} keys, 32/8 heads, D 128, {str(dtype)[6:]}"
            cases[f"{name}, bshd"] = lambda q=q, k=k, v=v: fa.attention_with_kvcache(q, k, v)
            cases[f"{name}, bhsd"] = lambda q=qh, k=kh, v=vh: fa.attention_with_kvcache(q, k, v, layout="bhsd")
    return cases


cases = {**step_cases(), **read_cases()}
times = {name: [] for name in cases}
with torch.no_grad():
    for fn in cases.values():
        for _ in range(20):
            fn()
    for _ in range(args.rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            times[name].append((time.perf_counter() - start) / args.calls)
for name, t in times.items():
    print(f"{name}\t{statistics.median(t) * 1e6:.1f}")
