"""What a provider is: a named implementation the harness times, and the baseline it is compared with.

Its own module so the provider families (ours, torch's, external, position) and the registry in
:mod:`.providers` all import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .case import Case

BASELINE = "torch-sdpa"  # speedups are measured against this provider, in the same run


@dataclass(frozen=True)
class Provider:
    """``family``: the spec family it serves (``"attention"`` or ``"position"``). ``slow_warmup``:
    left out of ``--quick`` (a compile or an interpreter before the first timed call).
    ``extra_bytes(case)``: memory it holds beyond the shared inputs (a dense mask built outside the
    timing), added to its peak-memory column. ``ops``: the only ops it is timed on (None: every op of
    its family); other rows leave it out instead of listing a refusal."""

    name: str
    fn: Callable[[Case], torch.Tensor]
    reasons: Callable[[Case], list[str]] | None = None
    family: str = "attention"
    slow_warmup: bool = False
    ops: frozenset[str] | None = None
    extra_bytes: Callable[[Case], int] | None = None

    def why_not(self, case: Case) -> list[str]:
        return list(self.reasons(case)) if self.reasons is not None else []

    def held_bytes(self, case: Case) -> int:
        return self.extra_bytes(case) if self.extra_bytes is not None else 0
