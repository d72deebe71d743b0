"""The mutation check's list stays applicable: every mutation's original text occurs exactly once in
its file, so a refactor cannot silently turn a mutation into a no-op (reported as "caught")."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mutations", ROOT / "tools" / "mutations.py")
mutations = importlib.util.module_from_spec(_spec)
sys.modules["mutations"] = mutations  # dataclasses look their module up while the class is built
_spec.loader.exec_module(mutations)


@pytest.mark.parametrize("m", mutations.MUTATIONS, ids=lambda m: m.name)
def test_mutation_applies_to_current_source(m):
    text = (ROOT / m.path).read_text()
    assert text.count(m.old) == 1, f"{m.name}: {m.old!r} occurs {text.count(m.old)} times in {m.path}"
    assert m.new != m.old
    for arg in m.tests:
        if arg.startswith("tests/"):
            assert (ROOT / arg.split("::")[0]).is_file(), f"{m.name}: no test file {arg}"
