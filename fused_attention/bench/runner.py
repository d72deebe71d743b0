"""``run(specs, providers)``: time every provider on every spec, with its errors against the float64
oracle and its peak memory; a provider that cannot run a row says why."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from .accuracy import Expected, case_rows, max_error, max_grad_error, only_rows, reference
from .case import Case, make_case
from .memory import peak_bytes
from .position_case import PositionCase, make_position_case, position_reference
from .provider import BASELINE, Provider
from .providers import default_providers
from .roofline import roofline_fraction
from .row import Row
from .spec import Spec
from .timing import time_fn

BASELINES = {"attention": BASELINE, "position": "naive"}  # speedup is against this provider
ROTATION_BYTES = 256 << 20  # CUDA: rotate input copies until they span this much (larger than L2)


def _error_text(e: BaseException) -> str:
    lines = f"{type(e).__name__}: {e}".strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _step(provider: Provider, case: Case | PositionCase, grad_out: torch.Tensor | None) -> Callable[[], object]:
    """One call of the row's full work: the forward (no grad), or forward and backward."""
    if grad_out is None:

        def forward() -> object:
            with torch.no_grad():
                return provider.fn(case)

        return forward
    inputs = case.grad_inputs()
    return lambda: torch.autograd.grad(provider.fn(case), inputs, grad_out)


def _timed(provider: Provider, cases: Sequence[Case | PositionCase], grad_out: torch.Tensor | None) -> Callable[[], object]:
    """What the timer calls, rotating through ``cases``: the forward, the forward and backward, or
    (``bwd``) only the backward of a forward run once per case beforehand."""
    mode = cases[0].spec.mode
    if mode == "bwd":
        outs = [(provider.fn(c), c.grad_inputs()) for c in cases]
        calls = [lambda o=o, i=i: torch.autograd.grad(o, i, grad_out, retain_graph=True) for o, i in outs]
    else:
        calls = [_step(provider, c, grad_out) for c in cases]
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def _rotation(case: Case | PositionCase) -> list[Case | PositionCase]:
    """CUDA: enough copies of the inputs that one timed call does not find the last one's in cache."""
    if torch.device(case.spec.device).type != "cuda":
        return [case]
    size = sum(t.numel() * t.element_size() for t in case.grad_inputs())
    copies = max(1, min(8, math.ceil(ROTATION_BYTES / max(1, size))))
    return [case, *(case.clone() for _ in range(copies - 1))]


def measure(
    provider: Provider,
    case: Case | PositionCase,
    expected: Expected,
    rows: torch.Tensor | None,
    grad_out: torch.Tensor | None = None,
    min_run_time: float = 0.2,
    peaks: dict[str, object] | None = None,
) -> Row:
    """One row; never raises for a provider's failure (the row's ``reason`` says what went wrong).
    ``grad_out``: the upstream gradient for the ``bwd`` modes (``expected`` holds the gradients for it
    with zeros outside ``rows``). The first call checks correctness and is the warm-up."""
    spec = case.spec
    row = Row.for_spec(provider.name, spec)
    try:
        reasons = provider.why_not(case)
    except Exception as e:  # noqa: BLE001  (a provider that cannot even judge the case cannot run it)
        reasons = [_error_text(e)]
    if reasons:
        row.reason = "; ".join(reasons)
        return row
    try:
        with torch.set_grad_enabled(grad_out is not None):
            out = provider.fn(case)
        row.max_error = max_error(out, expected.out, rows, case.row_dim)
        if grad_out is not None:
            check = only_rows(grad_out, rows, case.row_dim)
            grads = torch.autograd.grad(out, case.grad_inputs(), check, allow_unused=True)
            row.grad_error = max_grad_error(grads, expected.grads)
            del grads
        del out
        peak = peak_bytes(_step(provider, case, grad_out), spec.device)
        # The checked call and the memory call were the warm-up.
        median, iqr = time_fn(_timed(provider, _rotation(case), grad_out), spec.device, min_run_time, warmup=False)
    except Exception as e:  # noqa: BLE001  (a crash is this row's result, not the sweep's end)
        row.reason = _error_text(e)
        row.max_error = row.grad_error = None
        return row
    if peak is not None:
        row.peak_mem_mb = (peak + provider.held_bytes(case)) / 2**20
    row.median_ms, row.iqr_ms = median * 1e3, iqr * 1e3
    if spec.counts_bytes:
        row.gbps = spec.bytes / median / 1e9
    else:
        row.tflops = spec.flops / median / 1e12
    row.roofline = roofline_fraction(row, peaks)
    if rows is not None:
        row.error_rows = str(len(rows))
    return row


def _prepare(spec: Spec, seed: int) -> tuple[Case | PositionCase, torch.Tensor | None, torch.Tensor | None, Expected]:
    """The case, the compared rows, the upstream gradient (bwd modes) and the float64 reference."""
    if spec.family == "position":
        case: Case | PositionCase = make_position_case(spec, seed)
        rows = None
    else:
        case = make_case(spec, seed)
        rows = case_rows(case)
    grad_out = None
    if spec.mode != "fwd":
        gen = torch.Generator().manual_seed(seed + 1)
        shape = case.grad_inputs()[0].shape  # every output here is shaped like the query / x
        grad_out = torch.randn(*shape, generator=gen, dtype=torch.float64).to(spec.device, spec.torch_dtype)
    if spec.family == "position":
        expected = position_reference(case, grad_out)
    else:
        expected = reference(case, rows, None if grad_out is None else only_rows(grad_out, rows, case.row_dim))
    return case, rows, grad_out, expected


def run(
    specs: Iterable[Spec],
    providers: Iterable[Provider] | None = None,
    *,
    min_run_time: float = 0.2,
    seed: int = 0,
    progress: Callable[[Row], None] | None = None,
    peaks: dict[str, object] | None = None,
    time_budget_s: float | None = None,
    on_problem: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Times every provider of each spec's family on every spec (default providers:
    :func:`default_providers` of each spec's device) and returns one :class:`Row` per (spec, provider),
    including rows a provider could not run (with the reason). ``speedup`` is against ``torch-sdpa``
    (attention) or ``naive`` (position kernels) in the same spec. ``peaks``
    (:func:`~.roofline.measure_peaks`) fills the roofline column. ``time_budget_s``: start no new
    problem after this many seconds (the rows so far are returned). ``on_problem(rows_so_far)`` runs
    after each problem (to write partial results)."""
    specs = list(specs)
    fixed = list(providers) if providers is not None else None
    rows: list[Row] = []
    start = time.perf_counter()
    for spec in specs:
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            break
        case, sampled, grad_out, expected = _prepare(spec, seed)
        candidates = fixed if fixed is not None else default_providers(spec.device)
        spec_rows = []
        for provider in candidates:
            if provider.family != spec.family or (provider.ops is not None and spec.op not in provider.ops):
                continue
            spec_rows.append(measure(provider, case, expected, sampled, grad_out, min_run_time, peaks))
            if progress is not None:
                progress(spec_rows[-1])
        baseline = next((r for r in spec_rows if r.provider == BASELINES[spec.family] and r.median_ms), None)
        for row in spec_rows:
            if baseline is not None and row.median_ms:
                row.speedup = baseline.median_ms / row.median_ms
        rows.extend(spec_rows)
        del case, expected
        if on_problem is not None:
            on_problem(rows)
    return rows
