"""One result row: what ran, how fast, how accurate, how much memory, or why it did not run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .spec import Spec


@dataclass
class Row:
    provider: str
    op: str
    batch: int
    heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    dtype: str
    mode: str
    device: str
    median_ms: float | None = None
    iqr_ms: float | None = None  # spread: interquartile range of the timed runs
    tflops: float | None = None  # attention rows
    gbps: float | None = None  # position-kernel rows (minimum bytes moved / median)
    roofline: float | None = None  # tflops / measured matmul peak, or gbps / measured copy bandwidth
    speedup: float | None = None  # baseline median / this median, same spec, same run
    max_error: float | None = None  # max |out - float64 reference| (sampled rows for large shapes)
    grad_error: float | None = None  # bwd modes: max |grad - float64 reference grad| over the inputs
    error_rows: str = "all"  # "all" or how many query rows were compared
    peak_mem_mb: float | None = None  # growth over one call (see memory.py), plus a dense mask it holds
    reason: str = ""  # why the provider could not run this row (empty when it ran)

    @classmethod
    def for_spec(cls, provider: str, spec: Spec) -> Row:
        return cls(provider, spec.op, *spec.shape, spec.dtype, spec.mode, spec.device)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.batch, self.heads, self.seq_q, self.seq_k, self.head_dim)

    @property
    def ok(self) -> bool:
        return not self.reason

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


COLUMNS = tuple(f.name for f in dataclasses.fields(Row))
