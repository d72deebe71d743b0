"""The examples run at tiny sizes and their loss goes down."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--tiny"], check=False, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _losses(output: str) -> list[float]:
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", output)]
    assert len(losses) >= 2, output
    return losses


def test_bert_text_classification():
    pytest.importorskip("transformers")
    out = _run("bert_text_classification.py")
    before, after = (float(x) for x in re.findall(r"test loss (\d+\.\d+)", out))
    assert after < before, out


def test_transformer_encoder():
    out = _run("transformer_encoder.py")
    losses = _losses(out)
    assert losses[-1] < losses[0], out
    assert re.search(r"replaced 2 attention modules", out), out
