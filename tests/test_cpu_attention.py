"""What the ``cpu`` backend (C++ kernels) promises beyond the shared suite, which runs on it too:
every instruction-set variant is correct, hidden tiles are skipped, results are deterministic and
independent of the thread count where the backward does not split its tasks (test_cpu_backward_split.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ISA_REQUEST, check_attention, rand
from torch.nn.attention.bias import causal_lower_right

import fused_attention
from fused_attention._extension import load_extension
from fused_attention.backends import BACKENDS

pytestmark = pytest.mark.skipif(
    BACKENDS["cpu"].unavailable_reason() is not None, reason=str(BACKENDS["cpu"].unavailable_reason())
)
ROOT = Path(__file__).resolve().parents[1]


def _isas() -> list[str]:
    """The variants this CPU can run (the kernels pick the best; the variable forces one)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isas = ["baseline"]
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        if " avx2 " in flags and " fma " in flags:
            isas.append("avx2")
        if all(f" {f} " in flags for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd")):
            isas.append("avx512")
            if " avx512_bf16 " in flags:
                isas.append("avx512bf16")  # the bfloat16 decode on vdpbf16ps; the rest as avx512
                if all(f" {f} " in flags for f in ("amx_tile", "amx_bf16")):
                    isas.append("amx")  # and the bfloat16 forward on AMX tiles
    return isas


# Each non-default variant runs the shared suite's CPU cases on a sample: every test family of these
# files, at most SAMPLE_PER_TEST evenly spaced cases each (conftest's --sample-per-test), so a variant
# sees every feature, dtype, size, dropout, slope-gradient and varlen check without tripling CI time;
# and the decode kernel's cases, whose bfloat16 products differ per variant (WidenDot on avx512, vdpbf16ps
# on avx512bf16, tiles on amx). The best variant runs all of them in the main session.
SHARED_FILES = ("tests/test_attention.py", "tests/test_varlen.py", "tests/test_cpu_decode.py",
                "tests/test_cpu_decode_wide.py")
SAMPLE_PER_TEST = 5


def _other_isas() -> list[str]:
    """Every variant the CPU supports but the one this session's kernels run (the best, except on Intel
    CPUs without AMX, where avx512 is preferred to avx512bf16), and but amx: the flags do not say whether
    the build and the kernel grant it (when they do, it is the one running)."""
    running = load_extension().cpu_isa
    return [isa for isa in _isas() if isa not in (running, "amx")]


def _variant_env(isa: str) -> dict[str, str]:
    """The environment of a pytest process that runs the kernels' `isa` variant at two threads: without
    the worker's PYTEST_XDIST_* variables (so its conftest keeps the two threads), threads waiting for
    work sleeping instead of spinning against the other xdist worker."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_XDIST")}
    env.update(FA_TESTS_CPU_ISA=isa, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")
    return env


@pytest.mark.parametrize("isa", _other_isas())
def test_every_instruction_set_variant_passes_the_shared_suite(isa):
    """A sample of every shared test family, and the softmax's overflow and underflow paths (which lean
    on each variant's exp), in a process of its own that runs the variant (the variable is read once
    per process; conftest refuses to start if the kernels run another one). At two threads: pytest-xdist
    workers run one each, so these samples are what runs the kernels' multithreaded paths (per-thread
    mask-gradient buffers, split tasks) across the shared suite."""
    env = _variant_env(isa)
    for args in (
        [*SHARED_FILES, "-k", "cpu", "--sample-per-test", str(SAMPLE_PER_TEST)],
        ["tests/test_cpu_attention.py", "-k", "far_from or alibi_rows or overshoots"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        assert " passed" in result.stdout


def test_the_kernels_say_which_instruction_set_they_run_and_why():
    """The default is the best variant this CPU supports, except avx512 over avx512bf16 on Intel cores
    (their vdpbf16ps gives half the product rate of float FMAs; the variants differ only there), and
    `info` says why."""
    status = load_extension()
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert status.cpu_isa_reason and f"CPU attention kernels: {status.cpu_isa} ({status.cpu_isa_reason})" in fused_attention.info()
    if os.environ.get(ISA_REQUEST):
        assert status.cpu_isa == os.environ[ISA_REQUEST] and "FUSED_ATTENTION_CPU_ISA" in status.cpu_isa_reason
        return
    best = _isas()[-1]
    if best == "amx":  # (whether the build and the kernel grant AMX, the flags do not say)
        assert status.cpu_isa in ("amx", "avx512"), (status.cpu_isa, status.cpu_isa_reason)
    elif best == "avx512bf16" and "GenuineIntel" in cpuinfo:
        assert status.cpu_isa == "avx512" and "vdpbf16ps" in status.cpu_isa_reason, status.cpu_isa_reason
    elif "avx2" in _isas() and status.cpu_isa == "baseline":  # (the kernels also ask for BMI2)
        assert " bmi2 " not in cpuinfo, status.cpu_isa_reason
    else:
        assert status.cpu_isa == best, (status.cpu_isa, status.cpu_isa_reason)


@pytest.mark.parametrize("isa", ["AVX2", "amx" if "amx" not in _isas() else "no-such-isa"])
def test_a_bad_isa_request_leaves_the_package_usable(isa):
    """FUSED_ATTENTION_CPU_ISA naming an instruction set this CPU or build lacks, or misspelt: the import,
    `info` and automatic dispatch go on (the cpu backend is unavailable and says why); only a call forced
    to the cpu backend raises, naming the variable. (The import itself raised.)"""
    code = (
        "import torch, fused_attention as fa\n"
        "from fused_attention.backends import BACKENDS\n"
        "q = torch.randn(1, 2, 4, 8)\n"
        "assert torch.equal(fa.scaled_dot_product_attention(q, q, q), "  # (the torch backend: torch's kernel)
        "torch.nn.functional.scaled_dot_product_attention(q, q, q))\n"
        "print('reason:', BACKENDS['cpu'].unavailable_reason())\n"
        "try:\n    fa.scaled_dot_product_attention(q, q, q, backend='cpu')\n"
        "except ValueError as e:\n    print('forced:', e)\n"
        "print(fa.info())\n"
    )
    env = dict(os.environ, FUSED_ATTENTION_CPU_ISA=isa)
    env.pop(ISA_REQUEST, None)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("reason: FUSED_ATTENTION_CPU_ISA") and isa in lines[0], result.stdout
    assert lines[1].startswith("forced: ") and "FUSED_ATTENTION_CPU_ISA" in lines[1], result.stdout
    assert any(line.strip().startswith("cpu") and "unavailable: FUSED_ATTENTION_CPU_ISA" in line for line in lines)


def _median_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up: thread pool, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def test_window_skips_hidden_tiles():
    """window (255, 0) at L = S = 8192 sees 1/32 of the keys: it must cost a small fraction of full
    attention (a wide margin over the ideal, for noisy machines)."""
    q, k, v = (rand(1, 2, 8192, 64) for _ in range(3))

    def run(**kwargs):
        return lambda: fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu", **kwargs)

    full = _median_seconds(run())
    window = _median_seconds(run(window_size=(255, 0)))
    assert window < full / 6, (window, full)


def test_results_are_deterministic_and_independent_of_the_thread_count():
    """At 2 threads and 1: the 4 (batch, kv head) tasks divide evenly among the threads, so the backward
    does not split them (split tasks, test_cpu_backward_split.py, depend on the thread count)."""
    gen = torch.Generator().manual_seed(3)
    q = rand(2, 4, 77, 40, gen=gen, requires_grad=True)
    k, v = (rand(2, 2, 91, 40, gen=gen, requires_grad=True) for _ in range(2))
    kwargs = {"enable_gqa": True, "is_causal": True, "alibi_slopes": torch.rand(4, generator=gen), "dropout_p": 0.2}
    upstream = rand(2, 4, 77, 40, gen=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (2, 2, 1):
            torch.set_num_threads(n)
            torch.manual_seed(11)
            out = fused_attention.scaled_dot_product_attention(q, k, v, backend="cpu", **kwargs)
            results.append((out, *torch.autograd.grad(out, (q, k, v), upstream)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("jump", [30.0, 200.0, -200.0])
def test_scores_far_from_earlier_blocks_maximum(dtype, jump):
    """The forward reuses a row's running maximum for later key blocks: scores far above it (a running
    sum past the limit at +30, an overflow at +200) must fall back to an exact rescale, and scores far
    below it must simply vanish. Keys come in blocks of 512, so the jump sits in the second block."""
    gen = torch.Generator().manual_seed(5)
    q = rand(1, 2, 3, 64, gen=gen) * 0.1
    k = rand(1, 2, 1100, 64, gen=gen) * 0.1
    v = rand(1, 2, 1100, 64, gen=gen)
    q[..., 0] = 1.0
    k[:, :, 700:, 0] += jump  # scale 1: q.k jumps by `jump` from key 700 on
    check_attention("cpu", q.to(dtype), k.to(dtype), v.to(dtype), grad=False, scale=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi_rows_across_many_key_blocks(dtype, causal):
    """ALiBi rows move their softmax reference with the bias from key block to key block (blocks of 512):
    steep, shallow and negative slopes over 1300 keys, against the float64 reference."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (rand(1, 4, 1300, 64, gen=gen).to(dtype) for _ in range(3))
    slopes = torch.tensor([2.0, 0.3, 0.004, -0.01])
    check_attention("cpu", q, k, v, grad=False, alibi_slopes=slopes, is_causal=causal)


def test_alibi_reference_never_overshoots_the_scores():
    """Found in review: a window's edge (a row that is not plain) followed by plain ALiBi blocks with a
    negative slope, and a positive slope whose q.k falls as the bias rises, once moved the reference
    far above every score, so the row's sum underflowed to 0."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = (rand(1, 1, 2048, 16, gen=gen) for _ in range(3))
    check_attention("cpu", q, k, v, grad=False, window_size=(1024, 2048), alibi_slopes=torch.tensor([-0.2]))
    q = torch.zeros(1, 1, 1, 16, dtype=torch.float64)
    q[..., 0] = 1.0
    k = rand(1, 1, 1024, 16, gen=gen) * 0.01
    k[..., 0] = 0.0
    k[:, :, 512:, 0] = -150.0  # q.k = 0 on the first 512 keys, -150 after
    v = rand(1, 1, 1024, 16, gen=gen)
    for dtype in (torch.float32, torch.float64):
        check_attention("cpu", q.to(dtype), k.to(dtype), v.to(dtype), grad=False, scale=1.0,
                        alibi_slopes=torch.tensor([0.5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 128, 600])
@pytest.mark.parametrize("causal", [False, True])
def test_a_nan_key_makes_exactly_the_rows_that_see_it_nan(dtype, rows, causal):
    """One key's NaN is a NaN score among finite ones in the rows that see it (the row maximum passes
    over it; the exp pass must carry it to the output), and nothing in the rows that do not: the decode
    (1, 8 rows), the forward's slabs and blocks (128, 600), and the backward."""
    keys = rows + 100
    q, k, v = (rand(2, h, n, 64, dtype=dtype) for h, n in ((4, rows), (2, keys), (2, keys)))
    k[0, 1, keys // 3, 7] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = causal_lower_right(rows, keys) if causal else None  # a decode step's alignment
    out = fused_attention.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, backend="cpu")
    seen = torch.zeros(2, 4, rows, dtype=torch.bool)
    seen[0, 2:] = torch.arange(rows) + keys - rows >= keys // 3 if causal else True
    assert torch.equal(out.isnan().any(-1), seen) and out[~seen].isfinite().all()
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g[1].isfinite().all() for g in grads)  # the other batch entry never sees the NaN
