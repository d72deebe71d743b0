"""The README stays true: its support table and its test command are the real ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fused_attention

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_support_table_matches_backend_capabilities():
    assert fused_attention.support_table() in README


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick_start, flags=re.DOTALL)
    assert len(commands) == 2
    assert commands[0].endswith("python -m fused_attention bench --quick")
    assert "python -m fused_attention check" in quick_start  # the correctness self-check stays documented
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r'^TEST_COMMAND="(.*)"$', ci, flags=re.MULTILINE).group(1)
    assert commands[1].endswith("&& " + test_command)


def test_python_snippets_run():
    """Every ```python block of the README runs as written (in one namespace, top to bottom)."""
    code = "\n\n".join(re.findall(r"```python\n(.*?)\n```", README, flags=re.DOTALL))
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - running our own README is the point


DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_python_snippets_run(doc):
    """Every ```python block of each page in docs/ runs as written (one namespace per page)."""
    code = "\n\n".join(re.findall(r"```python\n(.*?)\n```", doc.read_text(), flags=re.DOTALL))
    exec(compile(code, str(doc), "exec"), {})  # noqa: S102


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_measured_tables_equal_their_records():
    """Every table marked as copied from benchmarks/results/ equals its record (tools/results_tables.py)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "results_tables.py"), "--check"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
