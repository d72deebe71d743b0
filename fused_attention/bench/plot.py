"""PNG plots: for each op, mode, dtype, head count and head dim, TFLOP/s (or GB/s) and peak memory
against sequence length, one line per provider. matplotlib is optional: imported only here."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from .row import Row

MISSING = (
    "matplotlib is not installed, so no PNG plots were written "
    "(pip install matplotlib, or pip install 'fused_attention[bench]')"
)


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(MISSING) from e
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _length(r: Row) -> int:
    """The swept length: the query length (``L = S``), or the cache's key length for ``decode``."""
    return r.seq_k if r.op == "decode" else r.seq_q


def _groups(rows: Sequence[Row]) -> dict[tuple, dict[str, list[Row]]]:
    """``{(op, mode, dtype, heads, head_dim, device): {line label: rows sorted by length}}``; a
    provider gets one line per batch size only when a length was swept at several batch sizes."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        if r.ok:
            groups[(r.op, r.mode, r.dtype, r.heads, r.head_dim, r.device)].append(r)
    result = {}
    for key, group in groups.items():
        batches_per_length = defaultdict(set)
        for r in group:
            batches_per_length[(r.provider, _length(r))].add(r.batch)
        split = any(len(b) > 1 for b in batches_per_length.values())
        lines: dict[str, list[Row]] = defaultdict(list)
        for r in sorted(group, key=lambda r: (_length(r), r.batch)):
            lines[f"{r.provider} B={r.batch}" if split else r.provider].append(r)
        result[key] = dict(lines)
    return result


def plot(rows: Sequence[Row], out_dir: str | Path, title: str = "") -> list[Path]:
    """Writes one PNG per group under ``out_dir`` and returns the paths. Raises ImportError (with what
    to install) when matplotlib is missing."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for (op, mode, dtype, heads, dim, device), lines in _groups(rows).items():
        attention = next(iter(lines.values()))[0].tflops is not None
        fig, (speed_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
        for label, line in lines.items():
            seqs = [_length(r) for r in line]
            speed_ax.plot(seqs, [r.tflops if attention else r.gbps for r in line], marker="o", label=label)
            mem = [(_length(r), r.peak_mem_mb) for r in line if r.peak_mem_mb is not None and r.peak_mem_mb > 0]
            if mem:
                mem_ax.plot(*zip(*mem), marker="o", label=label)
        batches = sorted({r.batch for line in lines.values() for r in line})
        batch_text = f"B={batches[0]}" if len(batches) == 1 else f"B={batches[0]}..{batches[-1]}"
        speed_ax.set_ylabel("TFLOP/s" if attention else "GB/s")
        mem_ax.set_ylabel("peak memory (MiB)")
        mem_ax.set_yscale("log")
        lengths = sorted({_length(r) for line in lines.values() for r in line})
        for ax in (speed_ax, mem_ax):
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_xlabel("sequence length")
            ax.grid(True, alpha=0.3)
        speed_ax.legend(fontsize=8)
        fig.suptitle(f"{op} {mode} {dtype} {batch_text} H={heads} D={dim} ({device}) {title}".strip(), fontsize=10)
        fig.tight_layout()
        path = out / f"{op}_{mode.replace('+', '-')}_{dtype}_H{heads}_D{dim}_{device}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
