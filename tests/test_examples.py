"""The examples run at tiny sizes and their loss goes down."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--tiny", *args], check=False, capture_output=True, text=True,
        timeout=300,
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


def test_bert_text_classification_from_a_local_checkpoint(tmp_path):
    """``--model PATH``: a tiny BERT checkpoint and tokenizer saved here stand in for a downloaded one."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("bert_example", EXAMPLES / "bert_text_classification.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    words = sorted({w.lower() for w in example.POSITIVE + example.NEGATIVE + example.FILLER})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    config = transformers.BertConfig(
        vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    out = _run("bert_text_classification.py", "--model", str(tmp_path), "--steps", "4")
    assert "attention implementation: fused_attention" in out, out
    assert all(math.isfinite(x) for x in _losses(out)), out


def test_transformer_encoder():
    out = _run("transformer_encoder.py")
    losses = _losses(out)
    assert losses[-1] < losses[0], out
    assert re.search(r"replaced 2 attention modules", out), out
