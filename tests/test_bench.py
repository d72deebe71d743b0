"""The benchmark harness: FLOP and byte counts, rows with times and errors for every op and mode, a wrong
provider caught in the output and in the gradients, a provider that cannot serve a row saying why, peak
memory, the progress bar, plots, and ``bench --quick --out`` writing CSV, JSON and PNG."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from fused_attention import bench
from fused_attention.bench import Provider, Spec
from fused_attention.bench.memory import peak_bytes
from fused_attention.bench.position_providers import position_providers
from fused_attention.bench.progress import Progress
from fused_attention.reference import visibility

SMALL = {"batch": 2, "heads": 4, "seq_q": 48, "seq_k": 48, "head_dim": 16}


def small(op: str, mode: str = "fwd", **overrides) -> Spec:
    return Spec(op, **{**SMALL, **overrides}, mode=mode)


def test_flop_counts():
    assert bench.attention_flops(2, 3, 5, 7, 11) == 4 * 2 * 3 * 5 * 7 * 11
    assert bench.attention_flops(2, 3, 5, 7, 11, causal=True) == 2 * 2 * 3 * 5 * 7 * 11
    assert bench.attention_flops(1, 1, 4, 4, 4, mode="bwd") == 2.5 * 4 * 64
    assert bench.attention_flops(1, 1, 4, 4, 4, mode="fwd+bwd") == 3.5 * 4 * 64
    assert Spec("causal", 1, 2, 8, 8, 4, mode="fwd+bwd").flops == 3.5 * 2 * 2 * 64 * 4
    for op in ("alibi", "softcap", "mask", "gqa"):
        assert Spec(op, 2, 4, 8, 8, 4).flops == Spec("plain", 2, 4, 8, 8, 4).flops
    for seq_q, seq_k in ((600, 600), (100, 700), (300, 300)):  # the window count, against a brute force
        spec = Spec("window", 2, 3, seq_q, seq_k, 8)
        pairs = int(visibility(seq_q, seq_k, window_size=spec.window_size).sum())
        assert spec.flops == 4 * 8 * 2 * 3 * pairs
    padding = Spec("padding", 4, 2, 16, 64, 8)
    assert padding.seq_lengths == (48, 44, 40, 36)
    assert padding.flops == 4 * 8 * 2 * 16 * sum(padding.seq_lengths)
    varlen = Spec("varlen", 3, 2, 60, 60, 8)
    assert varlen.seq_lengths == (60, 50, 40)
    assert varlen.flops == 4 * 8 * 2 * (60**2 + 50**2 + 40**2) / 2
    with pytest.raises(ValueError, match="position kernel"):
        Spec("rope", 1, 1, 8, 8, 4).flops  # noqa: B018


def test_byte_counts():
    rope = Spec("rope", 2, 3, 10, 10, 8, "bfloat16")
    assert rope.bytes == 2 * (2 * 3 * 10 * 8) * 2 + 2 * 10 * 4 * 4
    sinusoidal = Spec("sinusoidal", 2, 3, 10, 10, 8, mode="fwd+bwd")
    assert sinusoidal.bytes == 2 * (2 * (2 * 3 * 10 * 8) * 4)
    with pytest.raises(ValueError, match="attention"):
        Spec("plain", 1, 1, 8, 8, 4).bytes  # noqa: B018


def test_decode_counts_the_cache_bytes_and_is_forward_only():
    spec = Spec("decode", 2, 8, 1, 100, 16, "bfloat16")
    assert spec.kv_heads == 2 and spec.counts_bytes
    assert spec.bytes == 2 * (2 * 2 * 100 * 16) * 2  # K and V, read once
    with pytest.raises(ValueError, match="forward only"):
        Spec("decode", 1, 4, 1, 100, 16, mode="fwd+bwd")
    specs = bench.sweep(["decode", "plain"], [64], modes=["fwd", "fwd+bwd"])
    assert [(s.op, s.mode, s.seq_q, s.seq_k) for s in specs if s.op == "decode"] == [("decode", "fwd", 1, 64)]


def test_paged_decode_provider_matches_the_reference_on_decode_rows_only():
    paged = bench.providers.ours_paged()
    rows = bench.run([small("decode", seq_q=1, seq_k=100), small("plain")], [paged], min_run_time=0.001)
    assert [r.op for r in rows] == ["decode"]  # timed on decode rows only
    assert rows[0].ok and rows[0].max_error < 1e-5 and rows[0].gbps > 0, rows[0]


def test_bad_specs_name_the_argument():
    for kwargs, name in (({"op": "nope"}, "op"), ({"mode": "both"}, "mode"), ({"heads": 0}, "heads")):
        with pytest.raises(ValueError, match=name):
            Spec(**{"op": "plain", "batch": 1, "heads": 1, "seq_q": 4, "seq_k": 4, "head_dim": 4, **kwargs})
    with pytest.raises(ValueError, match="seq_q == seq_k"):
        Spec("varlen", 1, 1, 4, 8, 4)
    with pytest.raises(ValueError, match="tokens"):
        bench.sweep(tokens=0)
    # dims may be any iterable, read once (the hidden-size check spent an iterator: no problems)
    assert bench.sweep(["plain"], [64], dims=iter([64]), hidden=128) == bench.sweep(["plain"], [64], dims=[64], hidden=128) != []


def test_cli_time_budget_may_be_unbounded():
    """--time-budget inf means no budget (only --min-run-time must be finite: inf ran forever)."""
    import argparse

    from fused_attention.bench.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--time-budget", "inf"]).time_budget == math.inf


def test_flash_attention_sweep_shapes():
    specs = bench.sweep(["plain"], [512, 16384], dims=[64, 128], tokens=16384, hidden=2048)
    assert {(s.batch, s.heads, s.seq_q, s.head_dim) for s in specs} == {
        (32, 32, 512, 64), (1, 32, 16384, 64), (32, 16, 512, 128), (1, 16, 16384, 128),
    }  # fmt: skip


def test_every_attention_op_and_mode_runs_and_is_accurate():
    providers = [bench.ours("torch"), bench.torch_providers("cpu")[0], bench.naive()]
    specs = [small(op, "fwd+bwd") for op in bench.ATTENTION_OPS if op != "decode"]
    specs += [small("plain"), small("gqa", "bwd"), small("varlen", "bwd"), small("decode", seq_q=1, seq_k=100)]
    rows = bench.run(specs, providers, min_run_time=0.001)
    assert len(rows) == len(specs) * len(providers)
    for row in rows:
        if row.op in ("softcap", "sinks") and row.provider.startswith("torch-"):
            assert row.reason == f"torch's SDPA has no {row.op}"
            continue
        assert row.ok, row
        rate = row.gbps if row.op == "decode" else row.tflops  # decoding is bound by reading K and V
        assert row.median_ms > 0 and row.iqr_ms >= 0 and rate > 0 and row.peak_mem_mb >= 0
        assert row.max_error < 1e-5, row
        assert (row.grad_error is None) == (row.mode == "fwd")
        if row.mode != "fwd":
            assert row.grad_error < 1e-5, row
        if row.op not in ("softcap", "sinks"):
            assert row.speedup is not None and row.speedup > 0
        if row.provider == bench.BASELINE:
            assert row.speedup == 1.0


def test_position_rows():
    specs = [Spec(op, 2, 3, 40, 40, 16, mode=mode) for op in bench.POSITION_OPS for mode in bench.MODES]
    providers = [p for p in position_providers("cpu") if not p.slow_warmup]
    rows = bench.run(specs, providers, min_run_time=0.001)
    assert {r.provider for r in rows} >= {"torch", "naive"}
    for row in rows:
        assert row.ok and row.gbps > 0 and row.tflops is None, row
        assert row.max_error < 1e-5 and (row.grad_error is None) == (row.mode == "fwd"), row
    assert all(r.speedup == 1.0 for r in rows if r.provider == "naive")


class _WrongGrad(torch.autograd.Function):
    """Identity forward, a backward that is 1% off."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


def test_wrong_provider_shows_large_error(monkeypatch):
    monkeypatch.setattr(bench.accuracy, "FULL_REFERENCE_MAX_SCORES", 1000)  # sample rows from L = 65 on
    def wrong_output(case):
        return bench.naive_attention(case.query, case.key, case.value, case.dense_mask(), case.is_causal) * 1.01

    def wrong_gradient(case):
        out = bench.naive_attention(case.query, case.key, case.value, case.dense_mask(), case.is_causal)
        return _WrongGrad.apply(out)

    specs = [small("plain"), small("alibi", "fwd+bwd"), small("causal", "bwd", seq_q=100, seq_k=100)]
    providers = [bench.ours("torch"), Provider("wrong", wrong_output), Provider("wrong-grad", wrong_gradient)]
    rows = bench.run(specs, providers, min_run_time=0.001)
    for spec in specs:
        by_name = {r.provider: r for r in rows if r.op == spec.op}
        right, bad, bad_grad = by_name["torch"], by_name["wrong"], by_name["wrong-grad"]
        assert bad.ok and bad.max_error > 1e-3 and bad.max_error > 100 * right.max_error
        assert bad_grad.max_error < 1e-5
        if spec.mode != "fwd":
            assert bad_grad.grad_error > 1e-3 and bad_grad.grad_error > 100 * right.grad_error
    assert by_name["torch"].error_rows == str(bench.accuracy.SAMPLED_ROWS)  # the large causal problem


@pytest.mark.parametrize("op", bench.ATTENTION_OPS)
def test_sampled_rows_match_full_reference(op):
    """The sampled-row reference (dense mask for the op, zero upstream gradient off the rows) agrees
    with the full oracle on those rows, gradients included."""
    case = bench.make_case(Spec(op, 2, 4, 90, 90, 8, mode="fwd" if op == "decode" else "fwd+bwd"))
    dim = case.row_dim
    rows = torch.tensor([0, 7, 45, 60, case.query.shape[dim] - 1])
    grad_out = bench.accuracy.only_rows(torch.randn(case.query.shape, dtype=torch.float64), rows, dim)
    full, sampled = bench.reference(case, None, grad_out), bench.reference(case, rows, grad_out)
    torch.testing.assert_close(sampled.out, full.out.index_select(dim, rows))
    for got, want in zip(sampled.grads, full.grads):
        torch.testing.assert_close(got, want)
    assert bench.sample_rows(4096, 8) is not None and bench.sample_rows(256, 4) is None


def test_provider_that_cannot_serve_reports_a_reason():
    def broken(case):
        raise RuntimeError("no kernel for this shape")

    spec = small("window")
    providers = [
        Provider("refuses", lambda c: c.query, lambda c: ["head dim 16 not supported"]),
        Provider("broken", broken),
    ]
    unavailable = [n for n, b in bench.providers.BACKENDS.items() if b.unavailable_reason()]
    providers += [bench.ours(n) for n in unavailable]
    rows = bench.run([spec], providers, min_run_time=0.001)
    assert len(rows) == len(providers)
    by_name = {r.provider: r for r in rows}
    assert by_name["refuses"].reason == "head dim 16 not supported"
    assert "RuntimeError: no kernel for this shape" in by_name["broken"].reason
    for name in unavailable:
        assert by_name[name].reason == bench.providers.BACKENDS[name].unavailable_reason()
    for row in rows:
        assert not row.ok and row.median_ms is None and row.max_error is None


def test_dense_providers_refuse_what_does_not_fit(monkeypatch):
    monkeypatch.setattr(bench.providers, "available_bytes", lambda device: 1 << 20)
    rows = bench.run([small("plain", seq_q=512, seq_k=512)], [bench.naive(), bench.ours("torch")], min_run_time=0.001)
    assert "GiB of dense L x S tensors" in rows[0].reason and rows[1].ok


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU method reads /proc")
def test_cpu_peak_memory_counts_one_call():
    size = 64 << 20
    peak = peak_bytes(lambda: torch.ones(size, dtype=torch.uint8), "cpu")
    assert size <= peak < size + (16 << 20)


def test_progress_bar_prints_tenths_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress(20, stream)
    row = bench.Row.for_spec("p", small("plain"))
    for _ in range(20):
        progress(row)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("[" + "#" * 30 + "] 20/20")


def _ran_rows():
    specs = [small("plain", seq_q=s, seq_k=s) for s in (32, 64)] + [Spec("rope", 1, 2, 32, 32, 8)]
    providers = [bench.ours("torch"), bench.naive(), *position_providers("cpu")[-1:]]
    return bench.run(specs, providers, min_run_time=0.001)


def test_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    paths = bench.plot(_ran_rows(), tmp_path)
    assert sorted(p.name for p in paths) == ["plain_fwd_float32_H4_D16_cpu.png", "rope_fwd_float32_H2_D8_cpu.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_plots_without_matplotlib_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        bench.plot(_ran_rows(), tmp_path)


def _bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fused_attention", "bench", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_quick_writes_csv_json_and_png(tmp_path):
    out = tmp_path / "results"
    proc = _bench("--quick", "--seq", "128", "--min-run-time", "0.01", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "| provider | op |" in proc.stdout and "command: python -m fused_attention bench --quick" in proc.stdout
    with (out / "bench.csv").open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == bench.COLUMNS
    assert {r["op"] for r in table} == {"plain", "causal", "alibi"}
    assert {r["mode"] for r in table} == {"fwd", "fwd+bwd"}
    assert {"torch", "torch-sdpa", "torch-math", "torch-flash", "naive"} <= {r["provider"] for r in table}
    assert "flex" not in {r["provider"] for r in table}  # slow to warm up: not in --quick
    payload = json.loads((out / "bench.json").read_text())
    meta = payload["meta"]
    assert meta["torch"] == torch.__version__ and "cpu" in meta and meta["peaks"]["matmul_tflops"] > 0
    assert len(payload["rows"]) == len(table)
    for row in payload["rows"]:
        assert set(row) == set(bench.COLUMNS) and row["max_error"] < 1e-4 and math.isfinite(row["roofline"])
    assert "| provider | op |" in (out / "bench.md").read_text()
    if "matplotlib" in sys.modules or _has_matplotlib():
        assert len(list(out.glob("*.png"))) == 6


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


@pytest.mark.parametrize(
    ("args", "named"),
    [(["--seq", "0"], "--seq"), (["--providers", "nope"], "--providers"), (["--exclude", "nope"], "--exclude"),
     (["--dtype", "int8"], "--dtype"), (["--device", "tpu"], "--device"),
     (["--min-run-time", "inf"], "--min-run-time"),  # (ran forever)
     (["--ops", "decode", "--modes", "bwd"], "--modes"),  # (these three ran: 0 rows, or 1 head, exit 0)
     (["--providers", "torch", "--exclude", "torch"], "--exclude"),
     (["--hidden", "8", "--dim", "64"], "hidden (8) must be at least the head dim (64)"),
     (["--out", os.devnull + "/results"], "--out")],  # (a traceback after the first problem had run)
)  # fmt: skip
def test_cli_bad_input_names_the_argument(args, named, capsys):
    from fused_attention.__main__ import main

    try:
        code = main(["bench", "--quick", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and named in err, err


def test_time_budget_stops_between_problems_and_partial_results_are_reported():
    def slow(case):
        time.sleep(0.05)
        return bench.naive_attention(case.query, case.key, case.value)

    seen = []
    specs = [small("plain", seq_q=s, seq_k=s) for s in (16, 32, 64)]
    rows = bench.run(specs, [Provider("slow", slow)], min_run_time=0.001, time_budget_s=0.01, on_problem=seen.append)
    assert [r.seq_q for r in rows] == [16] and len(seen) == 1


def test_cpu_timer_runs_with_torchs_threads():
    """CPU rows are timed with torch's intra-op threads, as the report says (torch's benchmark Timer runs
    its statement with one thread unless told otherwise: every CPU row was single-threaded)."""
    from fused_attention.bench.timing import time_cpu

    previous = torch.get_num_threads()
    seen: set[int] = set()
    try:
        torch.set_num_threads(2)
        time_cpu(lambda: seen.add(torch.get_num_threads()), min_run_time=0.01)
    finally:
        torch.set_num_threads(previous)
    assert seen == {2}
