"""Installs that lack a piece: no compiled extension (a failed native build), no numpy beside Triton, a
Triton without ``triton.knobs`` (3.2, torch 2.6's). The CLI must keep working and say what is missing.
Each case runs in a fresh interpreter, since what is imported decides the answers."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fused_attention"

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run(script: str, *, pythonpath: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    if pythonpath is not None:
        environ["PYTHONPATH"] = str(pythonpath)
        # An editable install (`pip install -e .`, as CI does) adds a finder that maps the package back
        # to the checkout, ahead of PYTHONPATH: without it the copy under test is what imports.
        script = (
            "import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
            + script
        )
    return subprocess.run(
        [sys.executable, "-c", script], env=environ, cwd=pythonpath or PACKAGE.parent,
        capture_output=True, text=True, timeout=300, check=False,
    )


def _installed_without_extension(root: Path, note: str | None) -> Path:
    """The package as pip installs it when the C++ build failed: no _C, and setup.py's note if given."""
    shutil.copytree(PACKAGE, root / "fused_attention", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    if note is not None:
        (root / "fused_attention" / "_C_build_failure.txt").write_text(note + "\n")
    return root


INFO = "import sys; from fused_attention.__main__ import main; sys.exit(main(['info']))"


@pytest.mark.parametrize("recorded", [True, False], ids=["build-failed", "never-built"])
def test_info_says_why_the_extension_is_missing(tmp_path, recorded):
    note = "the compiled extension fused_attention._C could not be built (RuntimeError: no compiler)"
    root = _installed_without_extension(tmp_path, note if recorded else None)
    result = _run(INFO, pythonpath=root)
    assert result.returncode == 0, result.stderr
    expected = note if recorded else "compiled extension fused_attention._C is not built (no _C library in"
    lines = result.stdout.splitlines()
    assert any(line.startswith("extension fused_attention._C: not loaded: " + expected) for line in lines), result.stdout
    assert any(line.split()[:2] == ["cpu", "unavailable:"] and expected in line for line in lines), result.stdout
    assert any(line.split()[:2] == ["torch", "available"] for line in lines), result.stdout


@needs_triton
@pytest.mark.parametrize("interpret", ["1", "0"])
def test_triton_probe_without_numpy(interpret):
    # numpy is optional: torch does not need it, nor does Triton except for its interpreter.
    script = """
import sys
sys.modules["numpy"] = None  # as if it were not installed: importing it raises ImportError
import torch
from fused_attention.__main__ import main
from fused_attention.kernels.triton import triton_unavailable_reason
assert main(["info"]) == 0
print("REASON:", triton_unavailable_reason(torch.device("cpu")))
"""
    result = _run(script, TRITON_INTERPRET=interpret)
    assert result.returncode == 0, result.stderr
    expected = (
        "triton cannot be imported: the Triton interpreter (TRITON_INTERPRET=1) needs numpy"
        if interpret == "1"
        else "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    )
    assert f"REASON: {expected}" in result.stdout


@needs_triton
@pytest.mark.parametrize("interpret", ["1", "0"])
def test_triton_probe_without_knobs(interpret):
    # Triton 3.2/3.3 have no triton.knobs: their @triton.jit reads TRITON_INTERPRET, and so must we.
    script = """
import triton
if hasattr(triton, "knobs"):  # Triton 3.4+; 3.2/3.3 test the real thing
    del triton.knobs
import torch
from fused_attention.__main__ import main
from fused_attention.kernels.triton import triton_unavailable_reason
assert main(["info"]) == 0
print("REASON:", triton_unavailable_reason(torch.device("cpu")))
"""
    result = _run(script, TRITON_INTERPRET=interpret)
    assert result.returncode == 0, result.stderr
    expected = "None" if interpret == "1" else "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    assert f"REASON: {expected}" in result.stdout
