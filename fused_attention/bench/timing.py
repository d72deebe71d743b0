"""Timers: median and interquartile range of one call, in seconds.

CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (median of many blocks), with torch's current
number of intra-op threads (the Timer's default is one). CUDA:
``triton.testing.do_bench`` quantiles when Triton is installed, else CUDA events, after warm-up.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def time_cpu(fn: Callable[[], object], min_run_time: float = 0.2, warmup: bool = True) -> tuple[float, float]:
    from torch.utils import benchmark

    if warmup:  # first-call allocations, lazy initialization
        fn()
    # num_threads: the Timer runs the statement with 1 intra-op thread unless told otherwise
    measurement = benchmark.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
    ).blocked_autorange(min_run_time=min_run_time)
    return measurement.median, measurement.iqr


def time_cuda(fn: Callable[[], object], min_run_time: float = 0.2) -> tuple[float, float]:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        median, q25, q75 = do_bench(
            fn, warmup=25, rep=max(1, int(min_run_time * 1000)), quantiles=[0.5, 0.25, 0.75]
        )
        return median / 1e3, (q75 - q25) / 1e3
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    total = 0.0
    while total < min_run_time or len(times) < 10:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        total += times[-1]
    t = torch.tensor(times, dtype=torch.float64)
    q25, median, q75 = (
        float(x) for x in torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    )
    return median, q75 - q25


def time_fn(
    fn: Callable[[], object], device: str, min_run_time: float = 0.2, warmup: bool = True
) -> tuple[float, float]:
    """``(median, interquartile range)`` in seconds. ``warmup=False`` when ``fn`` has just run (CPU;
    the CUDA timers always warm up)."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, min_run_time)
    return time_cpu(fn, min_run_time, warmup)
