"""Command line: ``python -m fused_attention {info,check,bench}``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fused_attention",
        description="fused_attention: backend report, self-test and benchmarks",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{info,check,bench}")
    commands.add_parser(
        "info", help="versions, the compiled extension, and which backends are available and why not"
    )
    commands.add_parser(
        "check",
        help="self-test every available backend against the float64 reference (exit code 1 on a failure)",
    )
    bench = commands.add_parser(
        "bench",
        help="time every provider (ours, torch's SDPA, naive) with TFLOP/s, speedup and error columns",
    )
    from .bench.cli import add_arguments

    add_arguments(bench)
    args = parser.parse_args(argv)

    if args.command == "info":
        from . import info

        print(info())
        return 0
    if args.command == "bench":
        from .bench.cli import main as bench_main

        return bench_main(args, sys.argv[1:] if argv is None else argv)
    from .check import run_check

    return 0 if run_check() else 1


if __name__ == "__main__":
    sys.exit(main())
