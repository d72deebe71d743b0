"""``run(specs, providers)``: time every provider on every spec, with its error against the oracle."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .accuracy import max_error, reference_output, sample_rows
from .case import Case, make_case
from .providers import BASELINE, Provider, default_providers
from .row import Row
from .spec import Spec
from .timing import time_fn


def _call(provider: Provider, case: Case) -> Callable[[], object]:
    """The timed callable: the forward, or forward and backward (gradients of q, k, v)."""
    if case.spec.mode == "fwd":

        def forward() -> object:
            with torch.no_grad():
                return provider.fn(case)

        return forward
    inputs = case.grad_inputs()
    out = provider.fn(case)
    grad_out = torch.randn_like(out, requires_grad=False)

    def forward_backward() -> object:
        out = provider.fn(case)
        return torch.autograd.grad(out, inputs, grad_out)

    return forward_backward


def _error_text(e: BaseException) -> str:
    lines = f"{type(e).__name__}: {e}".strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def measure(
    provider: Provider,
    case: Case,
    reference: torch.Tensor,
    rows: torch.Tensor | None,
    min_run_time: float = 0.2,
) -> Row:
    """One row; never raises for a provider's failure (the row's ``reason`` says what went wrong)."""
    spec = case.spec
    row = Row.for_spec(provider.name, spec)
    try:
        reasons = provider.why_not(case)
    except Exception as e:  # noqa: BLE001  (a provider that cannot even judge the case cannot run it)
        reasons = [_error_text(e)]
    if reasons:
        row.reason = "; ".join(reasons)
        return row
    cuda = torch.device(spec.device).type == "cuda"
    try:
        with torch.set_grad_enabled(spec.mode != "fwd"):
            out = provider.fn(case)
        row.max_error = max_error(out, reference, rows)
        del out
        fn = _call(provider, case)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        median, iqr = time_fn(fn, spec.device, min_run_time)
        if cuda:
            row.peak_mem_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    except Exception as e:  # noqa: BLE001  (a crash is this row's result, not the sweep's end)
        row.reason = _error_text(e)
        row.max_error = None
        return row
    row.median_ms, row.iqr_ms = median * 1e3, iqr * 1e3
    row.tflops = spec.flops / median / 1e12
    return row


def run(
    specs: Iterable[Spec],
    providers: Iterable[Provider] | None = None,
    *,
    min_run_time: float = 0.2,
    seed: int = 0,
    progress: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Times every provider on every spec (default providers: :func:`default_providers` of each spec's
    device) and returns one :class:`Row` per (spec, provider), including rows a provider could not
    run (with the reason). ``speedup`` is against ``torch-sdpa`` when it ran in the same spec."""
    specs = list(specs)
    fixed = list(providers) if providers is not None else None
    rows: list[Row] = []
    for spec in specs:
        case = make_case(spec, seed)
        sampled = sample_rows(spec.seq_q, spec.batch * spec.heads)
        reference = reference_output(case, sampled)
        spec_rows = []
        for provider in fixed if fixed is not None else default_providers(spec.device):
            row = measure(provider, case, reference, sampled, min_run_time)
            if sampled is not None and row.max_error is not None:
                row.error_rows = str(len(sampled))
            spec_rows.append(row)
            if progress is not None:
                progress(row)
        baseline = next((r for r in spec_rows if r.provider == BASELINE and r.median_ms), None)
        for row in spec_rows:
            if baseline is not None and row.median_ms:
                row.speedup = baseline.median_ms / row.median_ms
        rows.extend(spec_rows)
    return rows
