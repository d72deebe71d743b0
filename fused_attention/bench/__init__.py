"""Benchmark harness: ``fused_attention.bench.run(specs, providers)`` and ``python -m fused_attention
bench``. Each row carries its time and spread, TFLOP/s or GB/s, its fraction of the measured roofline,
its speedup against torch's SDPA (or the naive formula) in the same run, its peak memory, and its
errors against the float64 reference; a provider that cannot run a row says why.

Time your own kernel beside ours::

    from fused_attention import bench
    mine = bench.Provider("mine", lambda case: my_attention(case.query, case.key, case.value, **case.kwargs))
    rows = bench.run(bench.sweep(["plain", "causal"], [1024, 2048]), [mine, *bench.torch_providers("cpu")])
    print(bench.markdown(rows))
"""

from .accuracy import Expected, max_error, reference, sample_rows
from .case import Case, make_case
from .plot import plot
from .position_case import PositionCase, make_position_case
from .providers import BASELINE, Provider, default_providers, naive, naive_attention, ours, torch_providers
from .report import machine, markdown, write
from .roofline import measure_peaks
from .row import COLUMNS, Row
from .runner import measure, run
from .spec import ATTENTION_OPS, MODES, OPS, POSITION_OPS, Spec, attention_flops, sweep

__all__ = [
    "ATTENTION_OPS",
    "BASELINE",
    "COLUMNS",
    "MODES",
    "OPS",
    "POSITION_OPS",
    "Case",
    "Expected",
    "PositionCase",
    "Provider",
    "Row",
    "Spec",
    "attention_flops",
    "default_providers",
    "machine",
    "make_case",
    "make_position_case",
    "markdown",
    "max_error",
    "measure",
    "measure_peaks",
    "naive",
    "naive_attention",
    "ours",
    "plot",
    "reference",
    "run",
    "sample_rows",
    "sweep",
    "torch_providers",
    "write",
]
