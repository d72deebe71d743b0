"""Output: the machine description, a markdown table, and CSV / JSON / markdown files."""

from __future__ import annotations

import csv
import datetime
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from .._version import __version__
from . import memory
from .row import COLUMNS, Row


def cpu_model() -> str:
    """The CPU's model name, with its x86 family and model numbers where /proc/cpuinfo has them: a cloud
    VM may show only "AMD EPYC" for CPUs whose vector units differ (family 25 is Zen 3/4, whose 512-bit
    FMAs run as two halves; 26 is Zen 5), and records taken on them are not comparable."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            numbers = f" (family {fields['cpu family']} model {fields['model']})" if "cpu family" in fields else ""
            return fields["model name"] + numbers
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The source checkout's commit (with ``+dirty`` for uncommitted changes), when run from one."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "fused_attention"],
            check=False, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{'+dirty' if dirty else ''}" if commit else None


def load_average() -> float | None:
    """The 1-minute load average (how busy a shared machine was), where the OS reports one."""
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine(device: str = "cpu") -> dict[str, object]:
    """Hardware and software of this run."""
    import os

    info: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fused_attention": __version__,
        "device": device,
        "memory_method": memory.method(device),
        "load_avg_start": load_average(),
    }
    commit = _git_commit()
    if commit:
        info["commit"] = commit
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def _num(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, fmt)


def _rate(r: Row) -> str:
    if r.tflops is not None:
        return f"{r.tflops:.3f} TFLOP/s"
    return "-" if r.gbps is None else f"{r.gbps:.1f} GB/s"


def markdown(rows: Sequence[Row]) -> str:
    """A markdown table, one line per row; rows that did not run show their reason."""
    header = [
        "provider", "op", "B", "H", "L", "S", "D", "dtype", "mode", "median ms", "IQR ms", "rate",
        "roofline", "speedup", "max err", "grad err", "peak MiB", "note",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        note = r.reason.replace("|", "/") if r.reason else ""
        if not r.reason and r.error_rows != "all":
            note = f"errors on {r.error_rows} sampled rows"
        cells = [
            r.provider,
            r.op,
            *map(str, r.shape),
            r.dtype,
            r.mode,
            _num(r.median_ms, ".3f"),
            _num(r.iqr_ms, ".3f"),
            _rate(r),
            "-" if r.roofline is None else f"{100 * r.roofline:.1f}%",
            "-" if r.speedup is None else f"{r.speedup:.2f}x",
            _num(r.max_error, ".1e"),
            _num(r.grad_error, ".1e"),
            _num(r.peak_mem_mb, ".1f"),
            note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header_text(meta: dict[str, object]) -> str:
    hardware = f"GPU {meta['gpu']}" if "gpu" in meta else f"CPU {meta['cpu']}"
    versions = ", ".join(f"{k} {meta[k]}" for k in ("torch", "triton", "python", "fused_attention") if k in meta)
    lines = [
        f"machine: {hardware} ({meta['cpu_count']} cores, {meta['torch_threads']} torch threads)",
        f"software: {versions}",
        f"command: {meta.get('command', '-')}",
        f"date: {meta['date']}" + (f", commit {meta['commit']}" if "commit" in meta else ""),
        f"load average (1 min): {meta.get('load_avg_start')} at the start, {meta.get('load_avg_end', '-')} at the end",
        f"peak memory: {meta.get('memory_method', '-')}",
    ]
    peaks = meta.get("peaks")
    if isinstance(peaks, dict):
        lines.append(
            f"roofline: best of measurements before and after the sweep, {peaks['matmul_tflops']:.3f} TFLOP/s ({peaks['matmul_dtype']} "
            f"{peaks['matmul_n']}^3 matmul), {peaks['copy_gbps']:.1f} GB/s ({peaks['copy_mib']} MiB copy)"
        )
    return "\n".join(lines)


LEGEND = (
    "speedup = baseline median / row median in the same run (baseline: torch-sdpa for attention, naive "
    "for position kernels); rate = TFLOP/s (forward 4*D per visible query-key pair, backward 2.5x) or "
    "GB/s (minimum bytes moved); roofline = rate / the measured peak above; max err / grad err = max "
    "|value - float64 reference|"
)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.as_dict().items()})


def write_json(rows: Sequence[Row], meta: dict[str, object], path: Path) -> None:
    def clean(v: object) -> object:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    payload = {"meta": meta, "rows": [{k: clean(v) for k, v in r.as_dict().items()} for r in rows]}
    path.write_text(json.dumps(payload, indent=1) + "\n")


def write(rows: Sequence[Row], meta: dict[str, object], out_dir: str | Path) -> list[Path]:
    """``bench.csv``, ``bench.json`` (rows plus ``meta``) and ``bench.md`` (header and table) under
    ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, md_path = out / "bench.csv", out / "bench.json", out / "bench.md"
    write_csv(rows, csv_path)
    write_json(rows, meta, json_path)
    md_path.write_text(f"```\n{header_text(meta)}\n```\n\n{markdown(rows)}\n\n{LEGEND}\n")
    return [csv_path, json_path, md_path]
