"""Benchmark harness: ``fused_attention.bench.run(specs, providers)`` and ``python -m fused_attention
bench``. Each row carries its time, TFLOP/s, speedup against torch's SDPA in the same run, and its
error against the float64 reference; a provider that cannot run a row says why."""

from .accuracy import max_error, reference_output, sample_rows
from .case import Case, make_case
from .providers import BASELINE, Provider, default_providers, naive, naive_attention, ours, torch_providers
from .report import machine, markdown, write
from .row import COLUMNS, Row
from .runner import measure, run
from .spec import MODES, OPS, Spec, attention_flops, sweep

__all__ = [
    "BASELINE",
    "COLUMNS",
    "MODES",
    "OPS",
    "Case",
    "Provider",
    "Row",
    "Spec",
    "attention_flops",
    "default_providers",
    "machine",
    "make_case",
    "markdown",
    "max_error",
    "measure",
    "naive",
    "naive_attention",
    "ours",
    "reference_output",
    "run",
    "sample_rows",
    "sweep",
    "torch_providers",
    "write",
]
