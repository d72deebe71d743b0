"""One benchmark session as the CLI and the scripts in ``benchmarks/`` run it: record the machine and
its measured peaks, run the sweep with a progress bar, print the table, and write CSV, JSON, markdown
and PNG plots (when ``out`` is given) after every problem and at the end."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import report
from .plot import plot
from .progress import Progress
from .provider import Provider
from .roofline import best_peaks, measure_peaks, roofline_fraction
from .row import Row
from .runner import run
from .spec import Spec


def run_session(
    specs: Sequence[Spec],
    providers: Sequence[Provider],
    *,
    device: str,
    command: str,
    out: str | Path | None = None,
    min_run_time: float = 0.2,
    time_budget_s: float | None = None,
) -> list[Row]:
    meta = report.machine(device)
    meta["command"] = command
    meta["peaks"] = measure_peaks(device)
    print(report.header_text(meta))
    families = {s.family for s in specs}
    names = sorted({p.name for p in providers if p.family in families})
    print(f"{len(specs)} problems; providers: {', '.join(names)}", flush=True)
    total = sum(1 for s in specs for p in providers if p.family == s.family)

    def save(rows: list[Row]) -> None:
        if out is not None:
            report.write(rows, meta, out)

    start = time.perf_counter()
    rows = run(
        specs,
        providers,
        min_run_time=min_run_time,
        progress=Progress(total),
        peaks=meta["peaks"],  # type: ignore[arg-type]
        time_budget_s=time_budget_s,
        on_problem=save,
    )
    meta["elapsed_s"] = round(time.perf_counter() - start, 2)
    meta["load_avg_end"] = report.load_average()
    # A second measurement of the ceilings after the sweep: the larger of the two is the better
    # estimate on a shared machine; the rows' roofline fractions follow it.
    meta["peaks"] = best_peaks(meta["peaks"], measure_peaks(device))  # type: ignore[arg-type]
    for row in rows:
        row.roofline = roofline_fraction(row, meta["peaks"])  # type: ignore[arg-type]
    print()
    print(report.markdown(rows))
    print(f"\n{len(rows)} rows in {meta['elapsed_s']:.1f} s. {report.LEGEND}")
    if len(rows) < total:
        print(f"bench: time budget reached: {len(rows)} of {total} rows ran", file=sys.stderr)
    if out is not None:
        for path in report.write(rows, meta, out):
            print(f"wrote {path}")
        try:
            paths = plot(rows, out, title=str(meta.get("gpu", meta["cpu"])))
        except ImportError as e:
            print(f"bench: {e}", file=sys.stderr)
        else:
            print(f"wrote {len(paths)} plots under {out}")
    return rows
