"""The benchmark harness: FLOP counts, rows with times and errors, a wrong provider caught, a provider
that cannot serve a row saying why, and ``bench --quick --out`` writing CSV and JSON."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from fused_attention import bench
from fused_attention.bench import Provider, Spec

SPECS = [
    Spec(op, 1, 2, 64, 64, 32, "float32", mode)
    for op in ("plain", "causal", "alibi", "window")
    for mode in ("fwd", "fwd+bwd")
]


def test_flop_counts():
    assert bench.attention_flops(2, 3, 5, 7, 11) == 4 * 2 * 3 * 5 * 7 * 11
    assert bench.attention_flops(2, 3, 5, 7, 11, causal=True) == 2 * 2 * 3 * 5 * 7 * 11
    assert bench.attention_flops(1, 1, 4, 4, 4, mode="fwd+bwd") == 3.5 * 4 * 64
    assert Spec("causal", 1, 2, 8, 8, 4, mode="fwd+bwd").flops == 3.5 * 2 * 2 * 64 * 4


def test_rows_for_our_torch_backend_and_baselines():
    providers = [bench.ours("torch"), *bench.torch_providers("cpu"), bench.naive()]
    rows = bench.run(SPECS, providers, min_run_time=0.01)
    assert len(rows) == len(SPECS) * len(providers)
    for row in rows:
        assert row.ok, row
        assert math.isfinite(row.median_ms) and row.median_ms > 0
        assert row.iqr_ms >= 0 and row.tflops > 0
        assert row.max_error < 1e-4, row
        assert row.speedup is not None and row.speedup > 0
        if row.provider == bench.BASELINE:
            assert row.speedup == 1.0


def test_wrong_provider_shows_large_error():
    def wrong(case):
        return (
            bench.naive_attention(case.query, case.key, case.value, case.dense_mask(), case.is_causal) * 1.01
        )

    specs = [Spec("plain", 1, 2, 64, 64, 32), Spec("alibi", 1, 2, 64, 64, 32, mode="fwd+bwd")]
    rows = bench.run(specs, [bench.ours("torch"), Provider("wrong", wrong)], min_run_time=0.01)
    for spec in specs:
        right = next(r for r in rows if r.provider == "torch" and r.op == spec.op)
        bad = next(r for r in rows if r.provider == "wrong" and r.op == spec.op)
        assert bad.ok and bad.max_error > 1e-3 and bad.max_error > 100 * right.max_error


def test_sampled_rows_match_full_reference():
    """The sampled-row reference (dense mask for the op) agrees with the full oracle on those rows."""
    for op in ("plain", "causal", "alibi", "window"):
        spec = Spec(op, 1, 2, 300, 300, 16)
        case = bench.make_case(spec)
        rows = torch.tensor([0, 7, 150, 299])
        full = bench.reference_output(case, None)[:, :, rows]
        torch.testing.assert_close(bench.reference_output(case, rows), full)
    assert bench.sample_rows(4096, 8) is not None and bench.sample_rows(256, 4) is None


def test_provider_that_cannot_serve_reports_a_reason():
    def broken(case):
        raise RuntimeError("no kernel for this shape")

    spec = Spec("window", 1, 2, 64, 64, 32)
    providers = [
        Provider("refuses", lambda c: c.query, lambda c: ["head dim 32 not supported"]),
        Provider("broken", broken),
    ]
    unavailable = [n for n, b in bench.providers.BACKENDS.items() if b.unavailable_reason()]
    providers += [bench.ours(n) for n in unavailable]
    rows = bench.run([spec], providers, min_run_time=0.01)
    assert len(rows) == len(providers)
    by_name = {r.provider: r for r in rows}
    assert by_name["refuses"].reason == "head dim 32 not supported"
    assert "RuntimeError: no kernel for this shape" in by_name["broken"].reason
    for name in unavailable:
        assert by_name[name].reason == bench.providers.BACKENDS[name].unavailable_reason()
    for row in rows:
        assert not row.ok and row.median_ms is None and row.max_error is None


@pytest.mark.slow
def test_cli_quick_writes_csv_and_json(tmp_path):
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "fused_attention",
        "bench",
        "--quick",
        "--seq",
        "128",
        "--modes",
        "fwd",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (
        "| provider | op |" in proc.stdout
        and "command: python -m fused_attention bench --quick" in proc.stdout
    )
    with (out / "bench.csv").open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == bench.COLUMNS
    assert {r["op"] for r in table} == {"plain", "causal", "alibi"}
    assert {"torch", "torch-sdpa", "torch-math", "naive"} <= {r["provider"] for r in table}
    payload = json.loads((out / "bench.json").read_text())
    assert payload["meta"]["torch"] == torch.__version__ and "cpu" in payload["meta"]
    assert len(payload["rows"]) == len(table)
    assert all(set(r) == set(bench.COLUMNS) for r in payload["rows"])
    assert all(r["max_error"] < 1e-4 for r in payload["rows"])
