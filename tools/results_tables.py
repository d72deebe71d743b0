"""Copies measured tables from ``benchmarks/results/`` into the README and ``docs/``, so no number shown
there can drift from the record it came from.

A page marks each copied table with the record it comes from and which of the record's markdown tables
(0 = the first) it is::

    <!-- results: benchmarks/results/2026-12-02-models-cpu/run1/models.md table 0 -->
    | ... the table, rewritten by this script ... |
    <!-- /results -->

``where COLUMN=VALUE,COLUMN=VALUE`` after the index keeps only the rows that match (a long record's
slice). The prose around the marker says when, where and with what command the record was measured (the
record itself says it too). ``python tools/results_tables.py`` rewrites every marked table;
``--check`` only reports the stale ones and exits 1 (``tests/test_readme.py`` runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
MARKER = re.compile(
    r"(?P<open><!-- results: (?P<path>\S+) table (?P<index>\d+)(?: where (?P<where>\S+))? -->\n)(?P<body>.*?)(?P<close><!-- /results -->)",
    re.DOTALL,
)


def markdown_tables(text: str) -> list[str]:
    """Every markdown table of ``text`` (consecutive lines starting with ``|``, a separator second)."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
            continue
        if len(current) >= 2 and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", current[1].replace(" ", "")):
            tables.append("\n".join(current) + "\n")
        current = []
    return tables


def select_rows(table: str, where: str) -> str:
    """The header, separator and the rows of ``table`` whose cells match every ``COLUMN=VALUE``."""
    lines = table.splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    header = cells[0]
    wanted = []
    for clause in where.split(","):
        column, value = clause.split("=", 1)
        if column not in header:
            raise KeyError(f"no column {column!r} in a table with columns {header}")
        wanted.append((header.index(column), value))
    rows = [line for line, row in zip(lines[2:], cells[2:]) if all(row[i] == v for i, v in wanted)]
    if not rows:
        raise ValueError(f"no row matches {where}")
    return "\n".join([*lines[:2], *rows]) + "\n"


def source_table(path: str, index: int, where: str | None = None) -> str:
    record = ROOT / path
    if not record.is_file():
        raise FileNotFoundError(f"{path}: no such results record")
    tables = markdown_tables(record.read_text())
    if index >= len(tables):
        raise IndexError(f"{path} has {len(tables)} tables, no table {index}")
    return tables[index] if where is None else select_rows(tables[index], where)


def refresh(text: str) -> str:
    """``text`` with every marked table replaced by the one its marker names."""
    return MARKER.sub(
        lambda m: m["open"] + source_table(m["path"], int(m["index"]), m["where"]) + m["close"], text
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report stale tables, change nothing")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        text = page.read_text()
        new = refresh(text)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    verb = "stale" if args.check else "rewritten"
    for page in stale:
        print(f"{page}: {verb}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
