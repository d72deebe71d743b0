"""fused_attention.nn.MultiheadAttention against torch.nn.MultiheadAttention on the CPU, same weights.

One thread, CPU time of the calling thread (time.thread_time), median of 5 calls, so other load on a
shared machine counts less; need_weights True and False, inference (no_grad, eval) and a training step.

    python benchmarks/mha_cpu.py [--batch 2] [--seq 1024] [--embed 512] [--heads 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fused_attention.nn as fnn


def _cpu_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append((time.thread_time() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(args.embed, args.heads, batch_first=True)
    ours = fnn.MultiheadAttention(args.embed, args.heads, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(args.batch, args.seq, args.embed)
    print("| mode | need_weights | torch (ms) | ours (ms) | speedup |\n|---|---|---|---|---|")
    for need_weights in (True, False):
        with torch.no_grad():
            ref.eval()
            ours.eval()
            t, o = (_cpu_ms(lambda m=m, w=need_weights: m(x, x, x, need_weights=w)) for m in (ref, ours))
        print(f"| inference | {need_weights} | {t:.1f} | {o:.1f} | {t / o:.2f}x |")
        ref.train()
        ours.train()

        def step(module, need_weights=need_weights):
            out, _ = module(x, x, x, need_weights=need_weights)
            out.sum().backward()

        t, o = (_cpu_ms(lambda m=m: step(m)) for m in (ref, ours))
        print(f"| training step | {need_weights} | {t:.1f} | {o:.1f} | {t / o:.2f}x |")


if __name__ == "__main__":
    main()
