"""Where a small call's time goes on a GPU: the wall time per call (synchronized) of ours and of torch's
SDPA, the host side under cProfile (what Python spends per call), and the kernels the call launches
with their device times (torch.profiler). For the shapes whose cost is mostly not arithmetic: a BERT
batch of 128 tokens (forward, and forward + backward), a decode step through ``scaled_dot_product_attention`` and one through
``attention_with_kvcache`` (bfloat16, GQA 32/8, head dim 128, 4096 cached keys).

    python benchmarks/gpu_profile.py [--calls 50]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

import fused_attention as fa


def _cases(device: str) -> dict[str, tuple]:
    bf16 = {"device": device, "dtype": torch.bfloat16}
    bert = [torch.randn(8, 12, 128, 64, **bf16) for _ in range(3)]
    q = torch.randn(1, 32, 1, 128, **bf16)
    k, v = (torch.randn(1, 8, 4096, 128, **bf16) for _ in range(2))
    qc = q.transpose(1, 2).contiguous()
    kc, vc = (t.transpose(1, 2).contiguous() for t in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    trained = [t.clone().requires_grad_() for t in bert]
    upstream = torch.randn_like(bert[0])

    def step(attend):  # forward and backward, as a training step runs them
        return lambda: torch.autograd.grad(attend(*trained), trained, upstream)

    return {
        "bert-128 fwd": (lambda: fa.scaled_dot_product_attention(*bert), lambda: sdpa(*bert)),
        "bert-128 fwd+bwd": (step(fa.scaled_dot_product_attention), step(sdpa)),
        "decode sdpa": (
            lambda: fa.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            lambda: sdpa(q, k, v, enable_gqa=True),
        ),
        "decode kvcache": (lambda: fa.attention_with_kvcache(qc, kc, vc, cache_seqlens=4096), lambda: sdpa(q, k, v, enable_gqa=True)),
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _wall_us(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--device", default="cuda", help="cpu only to try the script itself")
    args = parser.parse_args()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device != "cpu":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for name, (ours, theirs) in _cases(args.device).items():
        for _ in range(3):  # compile, autotune, caches
            ours(), theirs()
        walls = {"ours": [], "torch": []}
        for _ in range(3):  # interleaved rounds
            walls["ours"].append(_wall_us(ours, args.calls))
            walls["torch"].append(_wall_us(theirs, args.calls))
        print(f"\n=== {name}: wall per call (synchronized), median of rounds: ours "
              f"{statistics.median(walls['ours']):.1f} us, torch SDPA {statistics.median(walls['torch']):.1f} us")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            ours()
        _sync()
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(18)
        print(f"--- host profile of {args.calls} calls (by own time)")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                ours()
            _sync()
        print("--- kernels of 5 calls")
        sort = "device_time_total" if args.device != "cpu" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
