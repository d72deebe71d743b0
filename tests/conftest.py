"""Shared test machinery: which backends run here, input factories, the tolerance policy and the shared
checks every backend goes through.

The session is made reproducible and independent of the caller's shell: every runtime
``FUSED_ATTENTION_*`` variable is removed before the package is imported (a stray ``FUSED_ATTENTION_BACKEND`` would silently
reroute every automatically dispatched call), and every test starts from a seed derived from its own
name, so its data does not depend on which tests ran before it or on ``-k``.
"""

from __future__ import annotations

import functools
import os
import random
import zlib

import pytest
import torch
import torch.utils._python_dispatch

# The CPU instruction-set variant a child run of the suite is asked to use (tests/test_cpu_attention.py):
# passed under a name of its own because every FUSED_ATTENTION_* variable is dropped just below.
ISA_REQUEST = "FA_TESTS_CPU_ISA"
# Build-time switches (read by setup.py, and by test_extension to know what was built) are kept.
BUILD_VARIABLES = ("FUSED_ATTENTION_SKIP_CUDA_BUILD", "FUSED_ATTENTION_FORCE_CUDA_BUILD")
for _name in [n for n in os.environ if n.startswith("FUSED_ATTENTION_") and n not in BUILD_VARIABLES]:
    del os.environ[_name]
if os.environ.get(ISA_REQUEST):
    os.environ["FUSED_ATTENTION_CPU_ISA"] = os.environ[ISA_REQUEST]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Under pytest-xdist (``-n``) each worker gets its share of the cores, and so do the suites it starts
# in subprocesses: torch's default (every core, in every worker) oversubscribes the machine, which
# slows OpenMP down badly. Tests of the kernels' threading set their thread counts themselves, and the
# instruction-set samples (test_cpu_attention.py) run the shared suite at two threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = max(1, _cores() // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 8 (each holds torch, Triton and its test data)."""
    return min(8, _cores())


# Without a GPU, Triton kernels run under the interpreter on CPU tensors. Triton reads this when a
# kernel is defined, so it is set before fused_attention (and its kernels) are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_method(name: str, flag: str) -> tuple | None:
    """``(numpy, triton.language, triton.runtime.interpreter, InterpreterBuilder's method name)`` for a shim
    to wrap; None without Triton or that method, or when the shim (marked ``flag`` on it) is in already."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return None
    original = getattr(interpreter.InterpreterBuilder, name, None)
    return None if original is None or getattr(original, flag, False) else (np, tl, interpreter, original)


def _interpreter_dot_widens_bfloat16() -> None:
    """Test-harness shim for a defect of Triton's interpreter (seen up to Triton 3.8): it keeps bfloat16
    values as their raw 16-bit patterns (numpy uint16) and its ``tl.dot`` (``InterpreterBuilder.
    create_dot``) hands those patterns to ``np.matmul`` as integers. Here a bfloat16 operand held that way
    is widened to the float32 it encodes (exact: the pattern is float32's upper half) before the dot, as
    tensor cores multiply bfloat16 exactly and accumulate in float32. The kernels are untouched; the
    backend's probe (:mod:`fused_attention.kernels.triton.interpreter_probe`) then finds bfloat16 dots
    right and serves bfloat16 on the CPU. Without Triton, or with an interpreter that holds bfloat16
    otherwise, nothing changes."""
    found = _interpreter_method("create_dot", "widens_bfloat16")
    if found is None:
        return
    np, tl, interpreter, original = found

    def widened(handle):
        if handle.dtype.scalar == tl.bfloat16 and handle.data.dtype == np.uint16:
            return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, *rest):
        return original(self, widened(a), widened(b), *rest)

    create_dot.widens_bfloat16 = True
    create_dot.unpatched = original  # for the test that the probe still sees the defect without the shim
    interpreter.InterpreterBuilder.create_dot = create_dot


def _interpreter_rounds_bfloat16() -> None:
    """Test-harness shim for another defect of Triton's interpreter (seen in Triton 3.6): its float32 to
    bfloat16 cast (``InterpreterBuilder.cast_impl``) drops the low 16 bits, rounding toward zero, where the
    GPU's ``.to(tl.bfloat16)`` (``cvt.rn.bf16.f32``) and torch round to nearest even. Truncated P tiles
    and outputs carried a same-signed error of up to one bfloat16 ulp, twice the GPU's, which the
    tolerance policy rejects on some draws (a (2, 2, 5, 16) forward: 8.2e-3 against a bound of 7.8e-3).
    Here that cast rounds to nearest even, as the hardware does; every other cast is the interpreter's."""
    found = _interpreter_method("cast_impl", "rounds_bfloat16")
    if found is None:
        return
    np, tl, interpreter, original = found

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return original(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        quiet = ((bits >> 16) | 0x40).astype(np.uint16)  # NaN stays NaN (its payload's top bit set)
        return interpreter.TensorHandle(np.where(np.isnan(src.data), quiet, rounded), tl.bfloat16)

    cast_impl.rounds_bfloat16 = True
    interpreter.InterpreterBuilder.cast_impl = cast_impl  # create_fp_trunc and the other casts call it


def _interpreter_patches_the_language_once() -> None:
    """Test-harness shim for a cost of Triton's interpreter (seen in Triton 3.8): every call of a
    ``@triton.jit`` helper runs ``_patch_lang`` for it (a scan of every member of ``triton.language`` and
    its submodules, ~1.5 ms a call, a quarter of the Triton tests' time), although the launch running it
    (``GridExecutor``) has patched those same modules, and a helper's patches, never restored, stay in
    place until then. Patching is idempotent; here a helper whose language modules are patched already in
    the running launch is called without patching them again; launches, and other helpers, go through the
    interpreter's own patching. Nothing a kernel computes changes."""
    try:
        import inspect
        import threading

        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if original is None or executor is None or getattr(original, "patches_once", False):
        return
    local = threading.local()  # .launches: per running launch, [its kernel, the modules patched in it]

    def running() -> list:
        if not hasattr(local, "launches"):
            local.launches = []
        return local.launches

    def languages(fn):
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_lang(fn):
        launches = running()
        if launches and fn is not launches[-1][0]:  # a helper's call, whose result the interpreter drops
            needed = languages(fn)
            if needed and needed <= launches[-1][1]:
                return None
            launches[-1][1] |= needed  # (a helper's patching stays in place, as the interpreter leaves it)
        elif launches:
            launches[-1][1] |= languages(fn)  # the launch's own patching, restored when it ends
        return original(fn)

    launch = executor.__call__

    def call(self, *args, **kwargs):
        launches = running()
        launches.append([self.fn, set()])
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    patch_lang.patches_once = True
    interpreter._patch_lang = patch_lang
    executor.__call__ = call


def _interpreter_skips_overflow_checks_it_never_asserts() -> None:
    """Test-harness shim for another cost of Triton's interpreter (seen in Triton 3.8): its options ask
    for ``sanitize_overflow``, so every int32 ``+``, ``-`` and ``*`` of a kernel also computes an overflow
    condition in int64 (five more interpreted ops), which ``device_assert`` then drops, as the
    interpreter's ``debug`` option is off (an int32 product past 2**31 wraps without a word): 11-40% of
    the time of three Triton tests measured. While ``debug`` is off, the options here say
    ``sanitize_overflow=False``, which only that unasserted condition reads. Nothing a kernel computes or
    checks changes."""
    try:
        import dataclasses

        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if (not dataclasses.is_dataclass(options) or getattr(options, "debug", True)
            or not getattr(options, "sanitize_overflow", False)):
        return
    builder.options = dataclasses.replace(options, sanitize_overflow=False)


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_dot_widens_bfloat16()
    _interpreter_rounds_bfloat16()
    _interpreter_patches_the_language_once()
    _interpreter_skips_overflow_checks_it_never_asserts()

from torch.nn.attention.bias import CausalBias

import fused_attention
from fused_attention import _extension
from fused_attention.backends import BACKENDS
from fused_attention.reference import reference_attention, reference_varlen_attention
from fused_attention.tolerance import within_tolerance

torch.manual_seed(0)  # a fixed state at the start (test modules must not draw from it: pytest_collection_finish)

# Backends whose docstrings promise float32 arithmetic for 16-bit inputs (the torch backend's chunked op,
# the cpu backend's C++ kernels, the AMX bfloat16 forward included): their 16-bit results are held to a
# bound built from the reference computed with float32 intermediates, which 16-bit arithmetic exceeds.
FLOAT32_ARITHMETIC = frozenset({"torch", "cpu"})
# Triton joins the shared suite under the interpreter on a sample: at most this many cases of each
# parametrized test function (evenly spaced), so CI stays in budget; see pytest_collection_modifyitems.
TRITON_SAMPLE_PER_TEST = 3


def pytest_addoption(parser):
    parser.addoption(
        "--sample-per-test", type=int, default=0,
        help="keep at most N evenly spaced cases of every parametrized test function (0: all)",
    )
    parser.addoption(
        "--triton-sample-per-test", type=int, default=TRITON_SAMPLE_PER_TEST,
        help="interpreted triton cases kept of each shared test function (plus one per dtype it serves)",
    )


def pytest_configure(config):
    requested = os.environ.get(ISA_REQUEST)
    status = _extension.load_extension()
    if requested and status.loaded and status.cpu_isa != requested:
        raise pytest.UsageError(f"{ISA_REQUEST}={requested} asked for, the kernels run {status.cpu_isa}")


def _sample(items: list, keep: int) -> list:
    """At most ``keep`` evenly spaced items of each test function (module + name), the first and the
    last included, in order."""
    families: dict[tuple, list] = {}
    for item in items:
        families.setdefault((item.module.__name__ if item.module else "", item.originalname), []).append(item)
    chosen = set()
    for members in families.values():
        n = len(members)
        picks = range(n) if n <= keep else {round(i * (n - 1) / (keep - 1)) for i in range(keep)} if keep > 1 else [0]
        chosen.update(id(members[i]) for i in picks)
    return [item for item in items if id(item) in chosen]


def _with_every_dtype(items: list, sample: list) -> list:
    """``sample`` plus, for each test function, the middle case of every ``dtype`` parameter value
    that ``items`` has and the sample lacks (so a sample never silently drops a dtype)."""
    def family(item):
        return item.module.__name__ if item.module else "", item.originalname

    def dtype(item):
        return item.callspec.params.get("dtype")

    covered = {(family(i), dtype(i)) for i in sample}
    missing: dict[tuple, list] = {}
    for item in items:
        if (family(item), dtype(item)) not in covered:
            missing.setdefault((family(item), dtype(item)), []).append(item)
    return sample + [members[len(members) // 2] for members in missing.values()]


# torch's global RNG as the test modules find it. Parameters built at import must not draw from it: what
# they got would depend on which modules were imported before them (-k, a file list, xdist's split), and a
# policy check of such data passed or failed by the company it kept.
_RNG_BEFORE_COLLECTION = torch.random.get_rng_state()


def pytest_collection_finish(session):
    if not torch.equal(_RNG_BEFORE_COLLECTION, torch.random.get_rng_state()):
        raise pytest.UsageError(
            "a test module drew from torch's global RNG at import (module-level data or parametrize values): "
            "use a torch.Generator of its own, or build the data inside the test"
        )


@pytest.hookimpl(trylast=True)  # after -k and -m deselection: samples what was selected
def pytest_collection_modifyitems(config, items):
    """Triton (interpreted, ~3 s a case) runs a sample of each shared test family, every dtype it serves
    here included; ``--sample-per-test`` samples every family (the CPU instruction-set variants use it)."""
    deselected = []
    triton = [i for i in items if getattr(i, "callspec", None) and i.callspec.params.get("backend") == "triton"]
    # Cases whose dtype triton does not serve here would only skip: the sample is drawn from the others.
    unserved = [i for i in triton if isinstance(i.callspec.params.get("dtype"), torch.dtype)
                and not serves("triton", i.callspec.params["dtype"])]
    deselected += unserved
    triton = [i for i in triton if i not in unserved]
    if triton:
        sample = _sample(triton, config.getoption("--triton-sample-per-test"))
        kept = {id(i) for i in _with_every_dtype(triton, sample)}
        deselected += [i for i in triton if id(i) not in kept]
    keep = config.getoption("--sample-per-test")
    remaining = [i for i in items if i not in deselected]
    if keep:
        kept = {id(i) for i in _sample(remaining, keep)}
        deselected += [i for i in remaining if id(i) not in kept]
    if deselected:
        gone = {id(i) for i in deselected}
        config.hook.pytest_deselected(items=deselected)
        items[:] = [i for i in items if id(i) not in gone]


@pytest.fixture(autouse=True)
def _seed_from_test_name(request):
    """Every test starts from its own seed: its data does not depend on test order or on ``-k``."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)


def cpu_backends() -> list[str]:
    """Backends that serve CPU tensors natively on this machine (the interpreted triton backend is not
    one of them: see :func:`shared_backends`)."""
    names = []
    for name, backend in BACKENDS.items():
        devices = backend.capabilities.device_types
        if backend.unavailable_reason() is None and (devices is None or "cpu" in devices):
            names.append(name)
    return names


def shared_backends() -> list[str]:
    """Every backend that can compute on CPU tensors here, triton included under the interpreter: each one
    runs the shared suite (triton on a sample, see ``TRITON_SAMPLE_PER_TEST``)."""
    names = cpu_backends()
    if BACKENDS["triton"].serves_device_reason(torch.device("cpu")) is None:
        names.append("triton")
    return names


@pytest.fixture(params=shared_backends())
def backend(request) -> str:
    return request.param


@functools.cache
def serves(backend: str, dtype: torch.dtype) -> bool:
    """Whether ``backend`` serves CPU tensors of ``dtype`` here, by its own reasons (interpreted triton
    serves bfloat16 where its probe finds the interpreter's bfloat16 dot right)."""
    from fused_attention.inputs import canonicalize

    x = torch.ones(1, 1, 1, 16, dtype=dtype)
    return dtype in BACKENDS[backend].capabilities.dtypes and not BACKENDS[backend].not_supported_reasons(
        canonicalize(x, x, x)
    )


def require(backend: str, *dtypes: torch.dtype) -> None:
    """Skips (with the reason) a case whose dtype the backend does not serve on this machine, e.g.
    float64 or (interpreted) bfloat16 on triton."""
    for dtype in dtypes:
        if not serves(backend, dtype):
            pytest.skip(f"{backend} does not serve {dtype} here")


def require_call(backend: str, q, k, v, **kwargs) -> None:
    """Skips (with the backend's own reasons) a dense call the backend cannot serve, e.g. triton with a
    head dim that is not a multiple of 8; every other backend serves every call of the shared suite."""
    from fused_attention.inputs import canonicalize

    reasons = BACKENDS[backend].not_supported_reasons(canonicalize(q, k, v, **kwargs))
    if reasons and backend == "triton":
        pytest.skip(f"{backend}: {'; '.join(reasons)}")


def multiple_for(backend: str, n: int) -> int:
    """The smallest head dim >= n the backend serves (identity values need head dim = key count)."""
    m = BACKENDS[backend].capabilities.head_dim_multiple
    return -(-n // m) * m


def rand(*shape, dtype=torch.float32, requires_grad=False, gen=None) -> torch.Tensor:
    t = torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)
    return t.requires_grad_(requires_grad)


def assert_policy(out: torch.Tensor, ref_dt: torch.Tensor, ref64: torch.Tensor, factor: float, what: str) -> None:
    """DESIGN.md's policy; infinities (lse of empty rows) must match exactly, sign included, and are then
    left out."""
    # compared on the CPU, where the references are computed (a GPU kernel's output arrives on its device)
    out, ref_dt, ref64 = out.detach().cpu(), ref_dt.detach().cpu(), ref64.detach().cpu()
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    inf = torch.isinf(ref64)
    assert torch.equal(torch.isinf(out), inf), f"{what}: infinities differ from the reference"
    if inf.any():
        assert torch.equal(out[inf].double(), ref64[inf].double()), f"{what}: infinities of the wrong sign"
        out, ref_dt, ref64 = (t.masked_fill(inf, 0.0) for t in (out, ref_dt.to(out.dtype), ref64))
    ok, err, bound = within_tolerance(out, ref_dt, ref64, factor)
    assert ok, f"{what}: max error {err:.3e} > bound {bound:.3e}"


def _leaf(t, dtype):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


def _is_16bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _float_tensors(kwargs: dict, names=("attn_mask", "alibi_slopes")) -> list[str]:
    return [
        n for n in names
        if isinstance(kwargs.get(n), torch.Tensor) and not isinstance(kwargs[n], CausalBias)
        and kwargs[n].is_floating_point()
    ]


def _reference_runs(ref_fn, args, kwargs, roles, upstream):
    """``{role: (out, lse, {name: grad})}`` for roles ``"64"`` (the oracle: float64, exact), ``"dt"`` (every
    intermediate in the inputs' dtype) and ``"32"`` (float32 intermediates), with every float argument as
    a fresh leaf. Every run but the oracle gets the upstream gradient in the inputs' dtype, as the backend
    does, and stores its results as the backend does (output in the inputs' dtype, the gradient of an
    extra float argument such as float32 ALiBi slopes in that argument's dtype)."""
    in_dtype = args["q"].dtype
    runs = {}
    for role in roles:
        dtype = {"64": torch.float64, "dt": in_dtype, "32": torch.float32}[role]
        leaves = {n: _leaf(t, dtype) for n, t in args.items()}
        ref_kwargs = dict(kwargs)
        for n in _float_tensors(kwargs):
            # Extra float arguments keep full precision unless they come in the inputs' dtype.
            ref_kwargs[n] = _leaf(kwargs[n], dtype if kwargs[n].dtype == in_dtype else torch.float64)
        out, lse = ref_fn(*leaves.values(), **ref_kwargs)
        wrt = {n: t for n, t in (*leaves.items(), *((n, ref_kwargs[n]) for n in _float_tensors(kwargs)))
               if t.requires_grad}
        grads = {}
        if wrt and upstream is not None:
            # The backend gets the upstream gradient in the input dtype: so does every run but float64.
            dout = upstream if role == "64" else upstream.to(in_dtype).to(out.dtype)
            grads = dict(zip(wrt, torch.autograd.grad(out, list(wrt.values()), dout)))
        if role != "64":
            out = out.to(in_dtype)
            grads = {n: g.to(kwargs[n].dtype if n in kwargs else in_dtype) for n, g in grads.items()}
        runs[role] = (out.detach(), lse.detach(), grads)
    return runs


def _check_against_reference(backend, call, ref_fn, args: dict, kwargs: dict, grad: bool) -> None:
    """The policy applied to one backend call, three ways: trained (return_lse, gradients of every input
    that requires grad: q, k, v, a float mask, ALiBi slopes), and for inference under ``no_grad``
    without ``return_lse`` (which may take another path, e.g. the torch backend's call to torch's SDPA).

    A backend in ``FLOAT32_ARITHMETIC`` is held, for 16-bit inputs on the trained path, to the reference
    computed with float32 intermediates (``ref_dt`` in 16-bit bounds any 16-bit arithmetic)."""
    dtype = args["q"].dtype
    out, lse = call(return_lse=True)
    with torch.no_grad():
        inference = call(return_lse=False)
    assert not isinstance(inference, tuple), "return_lse=False must return the output alone"
    assert out.dtype == inference.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    named = {**args, **{n: kwargs[n] for n in _float_tensors(kwargs)}}
    wrt = {n: t for n, t in named.items() if t.requires_grad} if grad else {}
    upstream = torch.randn(out.shape, dtype=torch.float64) if wrt else None
    strict = backend in FLOAT32_ARITHMETIC and _is_16bit(dtype)
    runs = _reference_runs(ref_fn, args, kwargs, ["dt", "64"] + (["32"] if strict else []), upstream)
    (ref_dt, lse_dt, g_dt), (ref64, lse64, g64) = runs["dt"], runs["64"]
    assert_policy(inference, ref_dt, ref64, 2, "output (no_grad, no lse)")
    bound_out, bound_lse, bound_g = runs["32"] if strict else (ref_dt, lse_dt, g_dt)
    label = " (bound: float32 intermediates)" if strict else ""
    assert_policy(out, bound_out, ref64, 2, "output" + label)
    assert_policy(lse, bound_lse, lse64, 2, "lse" + label)
    if not wrt:
        return
    grads = torch.autograd.grad(out, list(wrt.values()), upstream.to(out.dtype))
    for name, g in zip(wrt, grads):
        assert g.dtype == wrt[name].dtype, f"grad {name}: dtype {g.dtype}"
        assert_policy(g, bound_g[name], g64[name], 3, f"grad {name}{label}")


def check_attention(backend: str, q, k, v, *, grad: bool = True, **kwargs) -> None:
    """Runs ``backend`` and the reference (in q's dtype and in float64; in float32 too where the backend
    promises float32 arithmetic) and applies the policy to the output (with and without ``return_lse``,
    with and without grad mode), the lse and the gradients of every input that requires grad (q, k, v, a
    float mask, ALiBi slopes)."""
    require_call(backend, q, k, v, **{n: t for n, t in kwargs.items() if n != "dropout_p"})

    def call(**extra):
        return fused_attention.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs, **extra)

    _check_against_reference(backend, call, reference_attention, {"q": q, "k": k, "v": v}, kwargs, grad)


def check_varlen(backend: str, q, k, v, cu_q, cu_k, *, grad: bool = True, **kwargs) -> None:
    """:func:`check_attention` for packed sequences (``(total, H, D)`` with ``cu_seqlens``)."""
    require(backend, q.dtype)
    max_q, max_k = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())

    def call(**extra):
        return fused_attention.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend=backend, **kwargs, **extra)

    def ref_fn(q, k, v, **ref_kwargs):
        return reference_varlen_attention(q, k, v, cu_q, cu_k, **ref_kwargs)

    _check_against_reference(backend, call, ref_fn, {"q": q, "k": k, "v": v}, kwargs, grad)


class RecordingDispatch(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that records the name of every op dispatched while it is on (``seen``)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))
