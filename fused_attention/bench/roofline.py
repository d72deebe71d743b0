"""The device's measured ceilings, so each row shows its fraction of the roofline: a large matmul
(bfloat16 on CUDA, float32 on the CPU) in TFLOP/s and a device copy (read + write) in GB/s."""

from __future__ import annotations

import torch

from .row import Row
from .timing import time_fn

# Sizes: big enough to reach the ceiling, small enough to measure in about a second.
_MATMUL_N = {"cuda": 8192, "cpu": 2048}
_COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 27}


def _matmul_seconds(n: int, dtype: torch.dtype, device: str, min_run_time: float) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return time_fn(lambda: a @ b, device, min_run_time)[0]


def _copy_seconds(size: int, device: str, min_run_time: float) -> float:
    src = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)  # values do not matter
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device, min_run_time)[0]


def read_bytes(*tensors: torch.Tensor):
    """A function that reads every byte of ``tensors`` once (a float32 sum over them): the memory's read
    rate for as many bytes as they hold. Read as float32 whatever their dtype: torch's bfloat16 sum is
    bound by its arithmetic, not by memory (on a 2-vCPU Xeon, 2026-12-05: 16.8 GB/s over 256 MiB, where
    the same bytes as float32 read at 23.7)."""
    words = [t.reshape(-1).view(torch.uint8).view(torch.float32) for t in tensors]
    return lambda: [w.sum() for w in words]


def measure_peaks(device: str, min_run_time: float = 0.3) -> dict[str, object]:
    """``{"matmul_tflops", "matmul_dtype", "matmul_n", "copy_gbps", "copy_mib"}`` measured on ``device``."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    n = _MATMUL_N[kind]
    matmul_s = _matmul_seconds(n, dtype, device, min_run_time)
    copy_bytes = _COPY_BYTES[kind]
    copy_s = _copy_seconds(copy_bytes, device, min_run_time)
    return {
        "matmul_tflops": 2 * n**3 / matmul_s / 1e12,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_n": n,
        "copy_gbps": 2 * copy_bytes / copy_s / 1e9,
        "copy_mib": copy_bytes >> 20,
    }


def best_peaks(first: dict[str, object], second: dict[str, object]) -> dict[str, object]:
    """The higher ceiling of two measurements, each rate on its own."""
    best = dict(first)
    for key in ("matmul_tflops", "copy_gbps"):
        best[key] = max(first[key], second[key])  # type: ignore[type-var]
    return best


def roofline_fraction(row: Row, peaks: dict[str, object] | None) -> float | None:
    """TFLOP/s over the matmul ceiling (attention) or GB/s over the copy ceiling (position kernels)."""
    if not peaks:
        return None
    if row.tflops is not None:
        return row.tflops / peaks["matmul_tflops"]  # type: ignore[operator]
    if row.gbps is not None:
        return row.gbps / peaks["copy_gbps"]  # type: ignore[operator]
    return None
