"""Peak memory of one call, and the free memory that bounds what a provider may allocate.

CUDA: ``torch.cuda.max_memory_allocated`` growth over one call. CPU (Linux): the growth of the
process's resident-set high-water mark over one call, in this process: freed heap pages are first
returned to the OS (``malloc_trim``, so reused pages count again), then the high-water mark is reset
(writing 5 to ``/proc/self/clear_refs``) and ``VmHWM`` after the call is compared with ``VmRSS``
before it. Where that is not possible the column is empty."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from pathlib import Path

import torch

CPU_METHOD = "peak RSS growth of one call (malloc_trim, /proc/self/clear_refs, VmHWM - VmRSS)"
CUDA_METHOD = "torch.cuda.max_memory_allocated growth over one call"


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(match.group(1))


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _cpu_peak_bytes(fn: Callable[[], object]) -> int | None:
    try:
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS")
    except OSError:
        return None
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return (peak - base) * 1024


def _cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device) - base


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Extra bytes at the peak of one call of ``fn`` (its result counts until it returns)."""
    dev = torch.device(device)
    return _cuda_peak_bytes(fn, dev) if dev.type == "cuda" else _cpu_peak_bytes(fn)


def method(device: str) -> str:
    return CUDA_METHOD if torch.device(device).type == "cuda" else CPU_METHOD


def available_bytes(device: str) -> int:
    """Free memory on ``device`` (CPU: ``MemAvailable``; unknown: effectively unlimited)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return int(match.group(1)) * 1024 if match else 1 << 60
