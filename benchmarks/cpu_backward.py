"""The ``cpu`` backend's backward against torch's CPU SDPA at the shapes of issue 13's backward goals.

Forward+backward (float32) of GQA/MQA causal attention (B=1, Hq=8, Hkv in {1, 2}, L=S=2048, D=64),
where (batch x kv heads) is no larger than the thread count, and of short sequences ((8, 12, 128, 64),
(1, 4, 256, 64)); with the forward alone too, so the backward's share shows.

Timing: ``torch.utils.benchmark`` medians; torch and ours alternate ``--rounds`` times in this process
and each side keeps the median of its rounds, so load that comes and goes on a shared machine hits both
alike. The load (``uptime``) is printed with the table.

On a loaded Linux machine with autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``), a
process gets its session's share of the CPUs however many threads it runs, so wall time shows the
total work, not whether threads sat idle. The table therefore also reports, per call, the CPU time of
the busiest thread (``/proc/self/task/*/schedstat``, nanoseconds on the CPU): the wall time the call
would take on idle cores. Run it with ``OMP_WAIT_POLICY=passive`` so that threads waiting at the end of
a parallel region sleep instead of spinning (spinning would count as work).

    OMP_WAIT_POLICY=passive python benchmarks/cpu_backward.py [--rounds 5] [--min-run-time 0.3] [--threads N] [--only MQA]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F

import fused_attention
from fused_attention.bench.timing import time_cpu

# (name, B, Hq, Hkv, L, D, causal)
CASES = [
    ("MQA causal", 1, 8, 1, 2048, 64, True),
    ("GQA causal", 1, 8, 2, 2048, 64, True),
    ("short", 8, 12, 12, 128, 64, False),
    ("short", 1, 4, 4, 256, 64, False),
]


def _inputs(b, hq, hkv, length, dim):
    gen = torch.Generator().manual_seed(0)
    shapes = [(b, hq, length, dim), (b, hkv, length, dim), (b, hkv, length, dim)]
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def _runner(provider, q, k, v, causal, backward):
    gqa = q.shape[1] != k.shape[1]
    if provider == "torch, K V expanded":  # what torch's flash kernel needs: its GQA path is the math one
        k, v = (t.detach().repeat_interleave(q.shape[1] // t.shape[1], 1).requires_grad_() for t in (k, v))
        gqa = False

    def run():
        if provider == "ours":
            out = fused_attention.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa, backend="cpu")
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def _median_ms(fn, min_run_time: float) -> float:
    return time_cpu(fn, min_run_time, warmup=False)[0] * 1e3  # with torch's threads (Timer's default: 1)


def _thread_cpu_ns() -> dict[str, int]:
    times = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                times[tid] = int(f.read().split()[0])
        except OSError:  # a thread that ended
            pass
    return times


def _busiest_thread_ms(fn, calls: int) -> tuple[float, float]:
    """(CPU ms of the busiest thread, CPU ms of all threads) per call, over `calls` calls."""
    fn()
    before = _thread_cpu_ns()
    for _ in range(calls):
        fn()
    after = _thread_cpu_ns()
    deltas = [after[t] - before.get(t, 0) for t in after]
    return max(deltas) / calls / 1e6, sum(deltas) / calls / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load: {os.getloadavg()}")
    print("| case (B, Hq, Hkv, L=S, D) | mode | torch as | ours ms | torch ms | ratio | ours: busiest thread ms "
          "(all threads) | torch: busiest thread ms (all) | ratio by busiest thread |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, b, hq, hkv, length, dim, causal in CASES:
        if args.only not in name:
            continue
        q, k, v = _inputs(b, hq, hkv, length, dim)
        baselines = ["torch"] + (["torch, K V expanded"] if hq != hkv else [])
        for mode in ("fwd", "fwd+bwd"):
            providers = ["ours", *baselines]
            runs = {p: _runner(p, q, k, v, causal, mode != "fwd") for p in providers}
            wall = {p: [] for p in providers}
            busy = {p: [] for p in providers}
            for _ in range(args.rounds):
                for p in providers:
                    wall[p].append(_median_ms(runs[p], args.min_run_time))
                    busy[p].append(_busiest_thread_ms(runs[p], max(2, int(args.min_run_time * 1e3 / wall[p][-1]))))
            med = {p: statistics.median(wall[p]) for p in providers}
            med_busy = {p: tuple(statistics.median(x[i] for x in busy[p]) for i in range(2)) for p in providers}
            for base in baselines:
                print(f"| {name} ({b}, {hq}, {hkv}, {length}, {dim}) | {mode} | {base} | {med['ours']:.2f} "
                      f"| {med[base]:.2f} | {med[base] / med['ours']:.2f}x | {med_busy['ours'][0]:.2f} "
                      f"({med_busy['ours'][1]:.2f}) | {med_busy[base][0]:.2f} ({med_busy[base][1]:.2f}) "
                      f"| {med_busy[base][0] / med_busy['ours'][0]:.2f}x |", flush=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
