"""Command line: ``python -m fused_attention {info,check}``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fused_attention", description="fused_attention: backend report and self-test"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{info,check}")
    commands.add_parser(
        "info", help="versions, the compiled extension, and which backends are available and why not"
    )
    commands.add_parser(
        "check",
        help="self-test every available backend against the float64 reference (exit code 1 on a failure)",
    )
    args = parser.parse_args(argv)

    if args.command == "info":
        from . import info

        print(info())
        return 0
    from .check import run_check

    return 0 if run_check() else 1


if __name__ == "__main__":
    sys.exit(main())
