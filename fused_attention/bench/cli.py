"""``python -m fused_attention bench``: a sweep from a preset and flags, run as a
:func:`~.session.run_session` (table, progress bar, and with ``--out`` CSV, JSON, markdown and PNG)."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

import torch

from .presets import PRESETS
from .providers import default_providers
from .session import run_session
from .spec import DTYPES, MODES, OPS, sweep


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def finite_positive_float(text: str) -> float:
    """positive_float, finite (--min-run-time inf ran forever; --time-budget inf means no budget)."""
    value = positive_float(text)
    if value == math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _unwritable(path: Path) -> str | None:
    """Why the results cannot be written under ``path`` (created if missing), or None."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the directory ({e.strerror or e})"
    if not os.access(path, os.W_OK | os.X_OK):
        return "the directory is not writable"
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    presets = parser.add_mutually_exclusive_group()
    presets.add_argument("--preset", choices=sorted(PRESETS), help="a named sweep (default: 'default')")
    presets.add_argument("--quick", action="store_true", help="preset 'quick': under a minute on a 2-core CPU")
    presets.add_argument("--full", action="store_true", help="preset 'full': every op and mode, lengths to 4k")
    parser.add_argument("--ops", nargs="+", choices=OPS, metavar="OP", help=f"ops to time: {', '.join(OPS)}")
    parser.add_argument("--seq", nargs="+", type=positive_int, help="sequence lengths (L = S)")
    parser.add_argument("--batch", nargs="+", type=positive_int, help="batch sizes")
    parser.add_argument("--heads", nargs="+", type=positive_int, help="query head counts")
    parser.add_argument("--dim", nargs="+", type=positive_int, help="head dims")
    parser.add_argument("--tokens", type=positive_int, help="tokens per batch: batch = tokens // seq")
    parser.add_argument("--hidden", type=positive_int, help="hidden size: heads = hidden // dim")
    parser.add_argument(
        "--dtype", nargs="+", choices=DTYPES, metavar="DTYPE",
        help=f"{', '.join(DTYPES)} (default: float32 on the CPU, bfloat16 on CUDA)",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, metavar="MODE", help=", ".join(MODES))
    parser.add_argument("--providers", nargs="+", help="only these providers (default: all on the device)")
    parser.add_argument("--exclude", nargs="+", help="leave these providers out")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--min-run-time", type=finite_positive_float, help="seconds of timed runs per row")
    parser.add_argument("--time-budget", type=positive_float, help="start no new problem after this many seconds")
    parser.add_argument("--out", help="directory for bench.csv, bench.json, bench.md and PNG plots")


def _device(arg: str | None) -> str:
    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {arg}: CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {arg!r}")
    return arg


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    preset = PRESETS[args.preset or ("quick" if args.quick else "full" if args.full else "default")]

    def pick(name: str) -> object:
        value = getattr(args, name)
        return value if value is not None else preset.get(name)

    try:
        device = _device(args.device)
        cuda = torch.device(device).type == "cuda"
        specs = sweep(
            pick("ops"),
            pick("seq"),
            batches=pick("batch"),
            heads=pick("heads"),
            dims=pick("dim"),
            dtypes=pick("dtype") or (["bfloat16"] if cuda else ["float32"]),
            modes=pick("modes"),
            device=device,
            tokens=pick("tokens"),
            hidden=pick("hidden"),
        )
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    providers = default_providers(device, quick=bool(preset.get("quick")))
    known = {p.name for p in default_providers(device)}
    for flag, names in (("--providers", args.providers), ("--exclude", args.exclude)):
        unknown = sorted(set(names or ()) - known)
        if unknown:
            print(f"bench: {flag}: unknown {unknown}; available here: {sorted(known)}", file=sys.stderr)
            return 2
    if args.providers:
        providers = [p for p in default_providers(device) if p.name in args.providers]
    providers = [p for p in providers if p.name not in (args.exclude or ())]
    if not specs or not providers:  # (it ran, reported 0 rows and exited 0)
        why = "no problem (--modes: decode runs forward only)" if not specs else "no provider (--providers, --exclude)"
        print(f"bench: these options select {why}", file=sys.stderr)
        return 2

    if args.out is not None:  # before any problem runs, not after the first one
        problem = _unwritable(Path(args.out))
        if problem:
            print(f"bench: --out {args.out}: {problem}", file=sys.stderr)
            return 2
    argv = sys.argv[1:] if argv is None else argv
    run_session(
        specs,
        providers,
        device=device,
        command="python -m fused_attention " + shlex.join(argv),
        out=args.out,
        min_run_time=args.min_run_time or preset["min_run_time"],
        time_budget_s=args.time_budget,
    )
    return 0
