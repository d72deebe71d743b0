"""Context parallelism on one CPU machine: P gloo ranks with one thread each against one process with one
thread on the whole sequence (causal attention, forward + backward).

Each configuration runs in freshly spawned processes: ``single`` (1 process, our attention on the whole
sequence), ``zigzag`` and ``contiguous`` (:func:`ring_attention` layouts) and ``ulysses``
(:func:`ulysses_attention`). Reported per configuration, medians over ``--repeats`` iterations after one
warm-up: wall time of forward + backward (the slowest rank's, ranks start together after a barrier),
CPU time of the slowest rank (``time.process_time``, all its threads: what the rank computed, which other load on a
shared machine inflates less than wall time), and the peak memory of each rank: its inputs (q, k, v
and the upstream gradient, whole or sharded) plus the growth of its peak RSS during the timed
iterations over the RSS after the warm-up (Linux VmHWM, reset after the warm-up; activations,
gradients and communication buffers included). For the rings, the last iteration's per-step compute time and the time each step waited
for its receives (the overlap: near 0 when transfers hide behind compute).

With ``--rounds N`` the configurations run N times in turn (single, zigzag, ..., single, zigzag, ...), so
a change of the machine's load spreads over all of them; times are medians over every timed iteration
of every round, memory the median over rounds.

    python benchmarks/context_parallel.py [--length 8192] [--heads 8] [--dim 64] [--ranks 2] [--repeats 3]
        [--rounds 1] [--configs single,zigzag,contiguous,ulysses] [--json out.json]

A ring config may name its head groups (``ring_attention(head_groups=...)``) after a slash: ``zigzag/1``
runs one ring over every head; plain ``zigzag`` takes the default (on one thread, a ring per head).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _worker(rank: int, world: int, port: int, config: str, args: dict, out_path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    from fused_attention import scaled_dot_product_attention
    from fused_attention.distributed import ring, ring_attention, shard_sequence, ulysses_attention

    b, h, length, d = 1, args["heads"], args["length"], args["dim"]
    gen = torch.Generator().manual_seed(0)
    tensors = []
    for _ in range(4):  # q, k, v, upstream gradient: built whole from one seed, then this rank's shard
        whole = torch.randn(b, h, length, d, generator=gen)
        tensors.append(whole if config == "single" else shard_sequence(whole, layout=_layout(config)))
        del whole
    q, k, v, upstream = tensors
    for t in (q, k, v):
        t.requires_grad_()

    def step() -> None:
        if config == "single":
            out = scaled_dot_product_attention(q, k, v, is_causal=True)
        elif config == "ulysses":
            out = ulysses_attention(q, k, v, is_causal=True)
        else:
            name, _, groups = config.partition("/")
            out = ring_attention(q, k, v, is_causal=True, layout=name, head_groups=int(groups) if groups else None)
        torch.autograd.backward(out, upstream)
        for t in (q, k, v):
            t.grad = None

    steps: list = []
    ring.step_timer = lambda phase, i, compute, wait: steps.append((phase, i, compute, wait))
    step()  # warm-up
    _reset_peak()
    rss_start = _status_kb("VmRSS")
    walls, cpus = [], []
    for _ in range(args["repeats"]):
        steps.clear()
        dist.barrier()
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        step()
        cpus.append(time.process_time() - start_cpu)
        walls.append(time.perf_counter() - start_wall)
    growth_mb = (_status_kb("VmHWM") - rss_start) / 1024
    inputs_mb = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    result = {
        "wall_s": walls, "cpu_s": cpus, "peak_mb": inputs_mb + growth_mb, "inputs_mb": inputs_mb, "steps": steps,
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def _layout(config: str) -> str:
    return "zigzag" if config.partition("/")[0] in ("zigzag", "ulysses") else "contiguous"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(config: str, ranks: int, args: dict) -> list[dict]:
    world = 1 if config == "single" else ranks
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world, _free_port(), config, args, out_path), nprocs=world)
        with open(out_path) as f:
            return json.load(f)


def _step_sums(steps: list) -> dict:
    """(phase, step) -> (compute, wait), summed over the head groups (each runs its own ring)."""
    sums: dict = {}
    for phase, step, compute, wait in steps:
        c, w = sums.get((phase, step), (0.0, 0.0))
        sums[phase, step] = (c + compute, w + wait)
    return sums


def _uptime() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _summarize(rounds: list[list[dict]]) -> tuple[float, float, list[float]]:
    """Median wall and CPU seconds of the slowest rank over every iteration of every round, and each
    rank's median peak memory over the rounds."""
    walls = [max(r["wall_s"][i] for r in ranks) for ranks in rounds for i in range(len(ranks[0]["wall_s"]))]
    cpus = [max(r["cpu_s"][i] for r in ranks) for ranks in rounds for i in range(len(ranks[0]["cpu_s"]))]
    peaks = [statistics.median(ranks[rank]["peak_mb"] for ranks in rounds) for rank in range(len(rounds[0]))]
    return statistics.median(walls), statistics.median(cpus), peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="run the configurations this many times, in turn")
    parser.add_argument("--configs", default="single,zigzag,contiguous,ulysses")
    parser.add_argument("--json", default=None, help="also write the raw per-rank results here")
    args = parser.parse_args()
    # Fixed glibc thresholds (read at process start, so set before spawning): every large buffer is its
    # own mapping, returned to the OS when freed, so RSS follows live memory instead of the heap's
    # high-water mark, and peaks compare across configurations.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 16))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 16))
    settings = {"length": args.length, "heads": args.heads, "dim": args.dim, "repeats": args.repeats}
    configs = args.configs.split(",")
    print(f"B=1 H={args.heads} L={args.length} D={args.dim} float32 causal fwd+bwd; {args.ranks} ranks x 1 thread "
          f"vs 1 process x 1 thread; torch {torch.__version__}")
    raw: dict = {config: {"rounds": [], "loads": []} for config in configs}
    for _ in range(args.rounds):
        for config in configs:
            raw[config]["loads"].append(_uptime().split()[0])
            raw[config]["rounds"].append(run_config(config, args.ranks, settings))
    summary = {config: _summarize(raw[config]["rounds"]) for config in configs}
    base = summary.get("single")

    def ratio(base_value: float | None, x: float) -> str:
        return f"{base_value / x:.2f}x" if base_value else "-"

    print("\n| config | wall (s) | speedup (wall) | slowest rank CPU (s) | speedup (CPU) | peak RSS per rank (MB) "
          "| vs single | load (1-min avg) at each start |")
    print("|---|---|---|---|---|---|---|---|")
    for config in configs:
        wall, cpu, peaks = summary[config]
        peak_text = ", ".join(f"{p:.0f}" for p in peaks)
        mem_ratio = f"{max(peaks) / max(base[2]):.2f}x" if base else "-"
        print(f"| {config} | {wall:.2f} | {ratio(base and base[0], wall)} | {cpu:.2f} | "
              f"{ratio(base and base[1], cpu)} | {peak_text} | {mem_ratio} | {', '.join(raw[config]['loads'])} |")
    for config in configs:
        if config.partition("/")[0] not in ("zigzag", "contiguous"):
            continue
        print(f"\n{config}: per ring step, last iteration (compute s / wait for receives s), per rank")
        print("| phase | step | " + " | ".join(f"rank {r}" for r in range(args.ranks)) + " |")
        print("|---|---|" + "---|" * args.ranks)
        per_rank = [_step_sums(r["steps"]) for r in raw[config]["rounds"][-1]]
        for phase, step in per_rank[0]:
            cells = " | ".join(f"{s[phase, step][0]:.3f} / {s[phase, step][1]:.3f}" for s in per_rank)
            print(f"| {phase} | {step} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f)


if __name__ == "__main__":
    main()
