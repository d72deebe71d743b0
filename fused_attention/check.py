"""Self-test of every available attention backend: ``python -m fused_attention check`` (which then runs
the position-kernel checks of :mod:`.check_positions`).

Each backend runs a fixed set of small cases (forward and gradients) in float32 and bfloat16, on the
CPU and, when there is one, on the GPU, and is compared with :mod:`fused_attention.reference` by the
tolerance policy of DESIGN.md (FlashAttention's): with ``ref64`` the reference in float64 and
``ref_dt`` the reference with every intermediate in the tested dtype, a result passes when
``max|out - ref64| <= factor * max|ref_dt - ref64| + 1e-6``, factor 2 for outputs and 3 for gradients.
The oracle has no RNG, so dropout is not checked here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .backends import BACKENDS, Backend
from .check_positions import run_position_check
from .functional import scaled_dot_product_attention, varlen_attention
from .inputs import canonicalize
from .position import alibi_slopes
from .reference import reference_attention, reference_varlen_attention
from .tolerance import FORWARD_FACTOR, GRAD_FACTOR, within_tolerance
from .varlen_inputs import canonicalize_varlen

DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Case:
    """One check: float tensors (cast to the tested dtype), other tensors and plain arguments."""

    name: str
    floats: dict[str, torch.Tensor]  # float64 CPU: query/key/value (q/k/v for varlen), attn_mask
    grads: tuple[str, ...]  # which of ``floats`` get gradients
    others: dict[str, torch.Tensor] = field(default_factory=dict)  # moved to the device, dtype kept
    options: dict[str, Any] = field(default_factory=dict)
    varlen: bool = False

    @property
    def compares_lse(self) -> bool:
        return self.varlen or bool(self.options.get("return_lse"))


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _qkv(
    gen: torch.Generator, b: int, hq: int, hkv: int, seq_q: int, seq_k: int, d: int, dv: int | None = None
):
    return {
        "query": _randn(gen, b, hq, seq_q, d),
        "key": _randn(gen, b, hkv, seq_k, d),
        "value": _randn(gen, b, hkv, seq_k, dv or d),
    }


def cases(seed: int = 0) -> list[Case]:
    """The fixed case list: small, odd sizes, every feature the oracle can express."""
    gen = torch.Generator().manual_seed(seed)
    qkv = ("query", "key", "value")
    bool_mask = torch.rand(2, 1, 33, 47, generator=gen) < 0.7
    bool_mask[0, :, 5] = False  # a row that sees no key: output 0, gradient 0
    float_mask = _randn(gen, 1, 3, 33, 47)
    total_q, total_k = 61, 70
    return [
        Case("plain", _qkv(gen, 2, 3, 3, 33, 47, 32), qkv),
        Case("causal", _qkv(gen, 2, 3, 3, 50, 50, 32), qkv, options={"is_causal": True}),
        Case("gqa", _qkv(gen, 2, 6, 2, 33, 47, 32), qkv, options={"enable_gqa": True}),
        Case("bool_mask", {**_qkv(gen, 2, 3, 3, 33, 47, 32), "attn_mask": bool_mask}, qkv),
        Case(
            "float_mask+grad",
            {**_qkv(gen, 2, 3, 3, 33, 47, 32), "attn_mask": float_mask},
            (*qkv, "attn_mask"),
        ),
        Case("window", _qkv(gen, 2, 3, 3, 40, 56, 32), qkv, options={"window_size": (9, 4)}),
        Case("alibi", _qkv(gen, 1, 12, 12, 24, 40, 16), qkv, others={"alibi_slopes": alibi_slopes(12)}),
        Case("softcap", _qkv(gen, 2, 3, 3, 33, 47, 32), qkv, options={"softcap": 1.5, "scale": 0.6}),
        Case(
            "key_lengths",  # the second batch entry has no key at all
            _qkv(gen, 3, 2, 2, 20, 37, 32),
            qkv,
            others={"key_lengths": torch.tensor([29, 0, 37], dtype=torch.int32)},
        ),
        Case(
            "return_lse", _qkv(gen, 2, 3, 3, 45, 31, 32), qkv, options={"is_causal": True, "return_lse": True}
        ),
        Case(
            "combined",  # causal + window + alibi + softcap + key_lengths + GQA
            _qkv(gen, 2, 4, 2, 41, 29, 24),
            qkv,
            others={"alibi_slopes": alibi_slopes(4), "key_lengths": torch.tensor([29, 17])},
            options={
                "is_causal": True,
                "window_size": (12, -1),
                "softcap": 3.0,
                "enable_gqa": True,
                "return_lse": True,
            },
        ),
        Case("odd_sizes", _qkv(gen, 1, 2, 2, 97, 61, 40, 24), qkv),
        Case(
            "varlen",
            {
                "q": _randn(gen, total_q, 4, 32),
                "k": _randn(gen, total_k, 2, 32),
                "v": _randn(gen, total_k, 2, 32),
            },
            ("q", "k", "v"),
            others={
                "cu_seqlens_q": torch.tensor([0, 5, 38, 38, 61], dtype=torch.int32),
                "cu_seqlens_k": torch.tensor([0, 9, 40, 47, 70], dtype=torch.int32),
                "alibi_slopes": alibi_slopes(4),
            },
            options={"max_seqlen_q": 33, "max_seqlen_k": 31, "is_causal": True, "window_size": (20, 2)},
            varlen=True,
        ),
    ]


_REFERENCE_OPTIONS = ("is_causal", "scale", "enable_gqa", "window_size", "softcap")


def _call(case: Case, tensors: dict[str, torch.Tensor], backend: str | None) -> tuple[torch.Tensor, ...]:
    """The public function on ``tensors``; returns ``(out,)`` or ``(out, lse)``."""
    if case.varlen:
        args = [tensors[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")]
        options = {**case.options, "alibi_slopes": tensors.get("alibi_slopes"), "return_lse": True}
        max_q, max_k = options.pop("max_seqlen_q"), options.pop("max_seqlen_k")
        result = varlen_attention(*args, max_q, max_k, **options, backend=backend)
    else:
        extra = {n: t for n, t in tensors.items() if n not in ("query", "key", "value")}
        result = scaled_dot_product_attention(
            tensors["query"], tensors["key"], tensors["value"], **extra, **case.options, backend=backend
        )
    return tuple(result) if isinstance(result, tuple) else (result,)


def _reference(case: Case, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    options = {k: v for k, v in case.options.items() if k in _REFERENCE_OPTIONS}
    if case.varlen:
        args = [tensors[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")]
        return reference_varlen_attention(*args, alibi_slopes=tensors.get("alibi_slopes"), **options)
    extra = {n: t for n, t in tensors.items() if n not in ("query", "key", "value")}
    out, lse = reference_attention(tensors["query"], tensors["key"], tensors["value"], **extra, **options)
    return (out, lse) if case.compares_lse else (out,)


@dataclass
class Results:
    """Forward outputs and gradients (in ``case.grads`` order) of one run."""

    outputs: tuple[torch.Tensor, ...]
    grads: tuple[torch.Tensor, ...]


def _run(
    case: Case,
    fn: Callable[[Case, dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
    dtype: torch.dtype,
    device: torch.device | str,
    dout: torch.Tensor,
    with_grads: bool = True,
) -> Results:
    tensors = {n: t.to(device, dtype if t.is_floating_point() else t.dtype) for n, t in case.floats.items()}
    for name in case.grads if with_grads else ():
        tensors[name].requires_grad_(True)
    tensors.update({n: t.to(device) for n, t in case.others.items()})
    outputs = fn(case, tensors)
    grads: tuple[torch.Tensor, ...] = ()
    if with_grads:
        wrt = [tensors[n] for n in case.grads]
        grads = torch.autograd.grad(outputs[0], wrt, dout.to(device, outputs[0].dtype))
    return Results(tuple(o.detach() for o in outputs), tuple(g.detach() for g in grads))


def _reasons(backend: Backend, case: Case, dtype: torch.dtype, device: torch.device | str) -> list[str]:
    tensors = {n: t.to(device, dtype if t.is_floating_point() else t.dtype) for n, t in case.floats.items()}
    tensors.update({n: t.to(device) for n, t in case.others.items()})
    if case.varlen:
        args = [tensors[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")]
        options = dict(case.options)
        max_q, max_k = options.pop("max_seqlen_q"), options.pop("max_seqlen_k")
        inputs = canonicalize_varlen(
            *args, max_q, max_k, **options, alibi_slopes=tensors.get("alibi_slopes"), return_lse=True
        )
    else:
        extra = {n: t for n, t in tensors.items() if n not in ("query", "key", "value")}
        inputs = canonicalize(tensors["query"], tensors["key"], tensors["value"], **extra, **case.options)
    with torch.no_grad():  # backward support is judged separately (capabilities.backward)
        return backend.not_supported_reasons(inputs)


@dataclass
class Row:
    backend: str
    device: str
    case: str
    dtype: str
    status: str  # PASS, FAIL or SKIP
    forward: tuple[float, float] | None = None  # worst (err, bound) by err / bound
    grad: tuple[float, float] | None = None
    note: str = ""


def _worst(checks: list[tuple[bool, float, float]]) -> tuple[bool, tuple[float, float] | None]:
    if not checks:
        return True, None
    ok = all(c[0] for c in checks)

    def badness(c: tuple[bool, float, float]) -> float:
        return math.inf if not c[0] else c[1] / c[2]

    worst = max(checks, key=badness)
    return ok, (worst[1], worst[2])


def _check_one(
    backend: Backend,
    case: Case,
    dtype: torch.dtype,
    device: str,
    refs: dict[str, Results],
    dout: torch.Tensor,
) -> Row:
    row = Row(backend.name, device, case.name, str(dtype).removeprefix("torch."), "SKIP")
    reasons = _reasons(backend, case, dtype, device)
    if reasons:
        row.note = "; ".join(reasons)
        return row
    with_grads = backend.capabilities.backward
    try:
        got = _run(case, lambda c, t: _call(c, t, backend.name), dtype, device, dout, with_grads)
        with torch.no_grad():  # inference may take another path (torch's own SDPA, for the torch backend)
            inference = _run(case, lambda c, t: _call(c, t, backend.name), dtype, device, dout, False)
    except Exception as e:  # noqa: BLE001  (a crash fails this case, not the whole check)
        row.status, row.note = "FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:160]
        return row
    ref64, ref_dt = refs["float64"], refs["dtype"]
    fwd_ok, row.forward = _worst(
        [
            within_tolerance(o, d, r, FORWARD_FACTOR)
            for outputs in (got.outputs, inference.outputs)
            for o, d, r in zip(outputs, ref_dt.outputs, ref64.outputs)
        ]
    )
    grad_ok, row.grad = _worst(
        [within_tolerance(g, d, r, GRAD_FACTOR) for g, d, r in zip(got.grads, ref_dt.grads, ref64.grads)]
    )
    if not len(got.outputs) == len(inference.outputs) == len(ref64.outputs):
        fwd_ok, row.note = False, f"returned {len(got.outputs)} outputs, expected {len(ref64.outputs)}"
    if not with_grads:
        row.note = "forward only (backend has no backward)"
    row.status = "PASS" if fwd_ok and grad_ok else "FAIL"
    return row


def _devices(backend: Backend) -> tuple[list[str], list[str]]:
    """Devices this backend is checked on, and notes for the devices it skips."""
    present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices, skipped = [], []
    for device in present:
        reason = backend.serves_device_reason(torch.device(device))
        if reason:
            skipped.append(f"{backend.name} on {device}: {reason}")
        else:
            devices.append(device)
    return devices, skipped


def _fmt(pair: tuple[float, float] | None) -> str:
    return "-" if pair is None else f"{pair[0]:.1e} / {pair[1]:.1e}"


def run_check(print_fn: Callable[[str], None] = print) -> bool:
    """Runs every case on every available backend, prints a table and returns True when all pass."""
    start = time.perf_counter()
    print_fn(
        "fused_attention check: backends vs the float64 reference; pass when max|out - ref64| <= "
        f"{FORWARD_FACTOR:g}x (outputs) / {GRAD_FACTOR:g}x (gradients) max|ref_dtype - ref64| + 1e-6"
    )
    plan: list[tuple[Backend, list[str]]] = []
    notes = []
    for backend in BACKENDS.values():
        reason = backend.unavailable_reason()
        if reason:
            notes.append(f"{backend.name}: unavailable: {reason}")
            continue
        devices, skipped = _devices(backend)
        notes.extend(skipped)
        if devices:
            plan.append((backend, devices))
    if notes:
        print_fn("skipped:")
        for note in notes:
            print_fn(f"  {note}")

    header = f"{'backend':8s} {'device':6s} {'case':16s} {'dtype':9s} {'fwd err / bound':19s} "
    header += f"{'grad err / bound':19s} result"
    print_fn(header)
    print_fn("-" * len(header))
    rows: list[Row] = []
    gen = torch.Generator().manual_seed(1)
    for case in cases():
        shape = (
            _run(case, _reference, torch.float64, "cpu", torch.zeros(0), with_grads=False).outputs[0].shape
        )
        dout = torch.randn(shape, generator=gen, dtype=torch.float64)  # one upstream gradient per case
        ref64 = _run(case, _reference, torch.float64, "cpu", dout)
        for dtype in DTYPES:
            refs = {"float64": ref64, "dtype": _run(case, _reference, dtype, "cpu", dout)}
            for backend, devices in plan:
                for device in devices:
                    row = _check_one(backend, case, dtype, device, refs, dout)
                    rows.append(row)
                    line = f"{row.backend:8s} {row.device:6s} {row.case:16s} {row.dtype:9s} "
                    line += f"{_fmt(row.forward):19s} {_fmt(row.grad):19s} {row.status}"
                    print_fn(line + (f"  ({row.note})" if row.note else ""))
    counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}

    print_fn("\nposition kernels (forward) vs the float64 formulas:")
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    position_passed, position_failed = run_position_check(print_fn, devices)
    counts["PASS"] += position_passed
    counts["FAIL"] += position_failed
    rows_total = len(rows) + position_passed + position_failed
    elapsed = time.perf_counter() - start
    print_fn(
        f"{rows_total} checks: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
        f"in {elapsed:.1f} s"
    )
    return counts["FAIL"] == 0 and counts["PASS"] > 0
