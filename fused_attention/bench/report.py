"""Output: the machine description, a markdown table, and CSV / JSON files."""

from __future__ import annotations

import csv
import datetime
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from .row import COLUMNS, Row


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict[str, object]:
    """Hardware and software of this run."""
    import os

    from .. import __version__

    info: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fused_attention": __version__,
        "device": device,
    }
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


def markdown(rows: Sequence[Row]) -> str:
    """A markdown table, one line per row; rows that did not run show their reason."""
    header = [
        "provider",
        "op",
        "B",
        "H",
        "L",
        "S",
        "D",
        "dtype",
        "mode",
        "median ms",
        "IQR ms",
        "TFLOP/s",
        "vs SDPA",
        "max err",
        "note",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        note = (
            r.reason.replace("|", "/")
            if r.reason
            else ("" if r.error_rows == "all" else f"err on {r.error_rows} rows")
        )
        cells = [
            r.provider,
            r.op,
            *map(str, r.shape),
            r.dtype,
            r.mode,
            _num(r.median_ms, ".3f"),
            _num(r.iqr_ms, ".3f"),
            _num(r.tflops, ".3f"),
            "-" if r.speedup is None else f"{r.speedup:.2f}x",
            _num(r.max_error, ".1e"),
            note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header_text(meta: dict[str, object]) -> str:
    hardware = f"GPU {meta['gpu']}" if "gpu" in meta else f"CPU {meta['cpu']}"
    return (
        f"machine: {hardware} ({meta['cpu_count']} cores, {meta['torch_threads']} torch threads)\n"
        f"software: torch {meta['torch']}, python {meta['python']}, fused_attention "
        f"{meta['fused_attention']}\ncommand: {meta.get('command', '-')}\ndate: {meta['date']}"
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
    """``bench.csv`` and ``bench.json`` (rows plus ``meta``) under ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "bench.csv", out / "bench.json"
    write_csv(rows, csv_path)
    write_json(rows, meta, json_path)
    return [csv_path, json_path]
