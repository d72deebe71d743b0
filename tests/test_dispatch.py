"""Dispatch: automatic choice, forced backends, explanations, `info`, profiler names, a missing extension."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fused_attention
from fused_attention import _extension, backends
from fused_attention.backends import BACKENDS, Backend, Capabilities
from fused_attention.backends.dispatch import select
from fused_attention.inputs import canonicalize
from fused_attention.varlen_inputs import canonicalize_varlen

REPO = Path(fused_attention.__file__).resolve().parents[1]
B, H, L, S, E = 2, 4, 6, 9, 16


def _qkv(dtype=torch.float32, e=E, ev=E):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, L, e, generator=g, dtype=dtype), torch.randn(B, H, S, e, generator=g, dtype=dtype),
            torch.randn(B, H, S, ev, generator=g, dtype=dtype))


def _packed():
    """``(q, k, v, cu_q, cu_k, max_q, max_k)`` for two sequences, GQA 4 -> 2 heads."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, h, E, generator=g) for n, h in ((10, 4), (12, 2), (12, 2)))
    return q, k, v, torch.tensor([0, 4, 10]), torch.tensor([0, 7, 12]), 6, 7


def _expected_auto(inputs) -> str:
    return next(n for n in backends.priority(inputs.device.type) if not BACKENDS[n].not_supported_reasons(inputs))


def _unavailable(inputs) -> list[str]:
    return [n for n, b in BACKENDS.items() if b.not_supported_reasons(inputs)]


@pytest.fixture
def spy(monkeypatch):
    """Records which backend's attention / varlen_attention ran."""
    calls: list[str] = []
    for name, backend in BACKENDS.items():
        for method in ("attention", "varlen_attention"):
            original = getattr(backend, method)

            def wrapper(inputs, _name=name, _original=original):
                calls.append(_name)
                return _original(inputs)

            monkeypatch.setattr(backend, method, wrapper)
    return calls


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("FUSED_ATTENTION_BACKEND", raising=False)


@pytest.mark.parametrize("kwargs", [{}, {"alibi_slopes": torch.linspace(0.1, 1.0, H)}, {"is_causal": True, "return_lse": True}])
def test_automatic_dispatch_of_cpu_tensors(spy, kwargs):
    q, k, v = _qkv()
    expected = _expected_auto(canonicalize(q, k, v, **kwargs))
    fused_attention.scaled_dot_product_attention(q, k, v, **kwargs)
    assert spy == [expected]


def test_automatic_dispatch_of_varlen(spy):
    args = _packed()
    expected = _expected_auto(canonicalize_varlen(*args))
    assert fused_attention.varlen_attention(*args).shape == args[0].shape
    assert spy == [expected]


def test_remembered_choices_follow_the_priority_and_backend_tables(spy, monkeypatch):
    """Automatic choices are remembered per call signature; reordering a device's priority or swapping a
    backend in the table forgets them (attention and the position kernels), and undoing it restores."""
    from fused_attention.backends import dispatch, positional

    q, k, v = _qkv()
    first = _expected_auto(canonicalize(q, k, v))
    if first == "torch":
        pytest.skip("the cpu backend is not built: torch is the first choice either way")
    calls = [fused_attention.scaled_dot_product_attention(q, k, v) for _ in range(2)]
    with monkeypatch.context() as patch:
        patch.setitem(dispatch._PRIORITY, "cpu", ("torch", "cpu"))
        fused_attention.scaled_dot_product_attention(q, k, v)
    fused_attention.scaled_dot_product_attention(q, k, v)
    with monkeypatch.context() as patch:
        patch.setitem(dispatch.BACKENDS, "cpu", BACKENDS["torch"])  # (the spy records the torch backend's name)
        fused_attention.scaled_dot_product_attention(q, k, v)
    fused_attention.scaled_dot_product_attention(q, k, v)
    assert spy == [first, first, "torch", first, "torch", first]
    assert torch.equal(calls[0], calls[1])

    x = torch.randn(1, 2, 4, 8)
    auto = positional.select_position_backend(x)
    with monkeypatch.context() as patch:
        patch.setitem(positional._PRIORITY, "cpu", ("torch",))
        assert positional.select_position_backend(x).name == "torch"
        patch.setitem(positional.POSITION_BACKENDS, "torch", positional.POSITION_BACKENDS["cpu"])
        assert positional.select_position_backend(x).name == "cpu"
    assert positional.select_position_backend(x) is auto


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_forced_torch_backend_matches_torch(spy, grad):
    """Both paths of the torch backend (inference: torch's own fused SDPA; training: the chunked op) with a
    non-default scale, GQA and a mask, against torch's SDPA in float64 (its math kernel, not the one the
    backend calls)."""
    q = torch.randn(B, H, L, E, requires_grad=grad)
    k, v = (torch.randn(B, H // 2, S, E, requires_grad=grad) for _ in range(2))
    mask = torch.rand(L, S) > 0.3
    kwargs = {"attn_mask": mask, "scale": 0.3, "enable_gqa": True}
    out = fused_attention.scaled_dot_product_attention(q, k, v, backend="torch", **kwargs)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kwargs)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert spy == ["torch"]


@pytest.mark.parametrize("name", ["triton", "cuda", "cpu"])
def test_forced_unavailable_backend_raises_with_its_reasons(name, spy):
    q, k, v = _qkv()
    reasons = BACKENDS[name].not_supported_reasons(canonicalize(q, k, v))
    if not reasons:
        pytest.skip(f"{name} is available here")
    with pytest.raises(ValueError) as info:
        fused_attention.scaled_dot_product_attention(q, k, v, backend=name)
    assert repr(name) in str(info.value) and all(r in str(info.value) for r in reasons)
    assert spy == []


def test_unknown_backend_lists_the_known_names():
    q, k, v = _qkv()
    with pytest.raises(ValueError) as info:
        fused_attention.scaled_dot_product_attention(q, k, v, backend="flash")
    assert "'flash'" in str(info.value) and all(repr(n) in str(info.value) for n in BACKENDS)


def test_env_var_forces_a_backend(monkeypatch, spy):
    q, k, v = _qkv()
    automatic = select(canonicalize(q, k, v)).name
    monkeypatch.setenv("FUSED_ATTENTION_BACKEND", "torch")
    fused_attention.scaled_dot_product_attention(q, k, v)
    assert spy == ["torch"]
    # set and unset while running: read on every call (the dispatch reads CPython's environment dict)
    monkeypatch.setenv("FUSED_ATTENTION_BACKEND", "")
    fused_attention.scaled_dot_product_attention(q, k, v)
    monkeypatch.delenv("FUSED_ATTENTION_BACKEND")
    fused_attention.scaled_dot_product_attention(q, k, v)
    assert spy == ["torch", automatic, automatic]
    # os.environ replaced as a whole (mock.patch("os.environ", {...})): still read
    environ = os.environ
    monkeypatch.setattr(os, "environ", {**environ, "FUSED_ATTENTION_BACKEND": "torch"})
    fused_attention.scaled_dot_product_attention(q, k, v)
    assert spy[-1] == "torch"
    monkeypatch.setattr(os, "environ", environ)
    monkeypatch.setenv("FUSED_ATTENTION_BACKEND", "torch")
    unavailable = _unavailable(canonicalize(q, k, v))
    if unavailable:
        monkeypatch.setenv("FUSED_ATTENTION_BACKEND", unavailable[0])
        with pytest.raises(ValueError, match=repr(unavailable[0])):
            fused_attention.scaled_dot_product_attention(q, k, v)


def test_invalid_env_var_raises_and_the_argument_wins(monkeypatch, spy):
    q, k, v = _qkv()
    monkeypatch.setenv("FUSED_ATTENTION_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        fused_attention.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="bogus"):
        fused_attention.varlen_attention(*_packed())
    assert spy == []
    fused_attention.scaled_dot_product_attention(q, k, v, backend="torch")
    assert spy == ["torch"]


def test_explain_gives_a_reason_for_every_unavailable_backend():
    q, k, v = _qkv()
    for inputs in (canonicalize(q, k, v), canonicalize_varlen(*_packed())):
        explained = backends.explain(inputs)
        names = [n for n, _ in explained]
        order = backends.priority("cpu")
        assert sorted(names) == sorted(BACKENDS) and tuple(names[: len(order)]) == order
        for name, reasons in explained:
            assert reasons == BACKENDS[name].not_supported_reasons(inputs)
            assert all(isinstance(r, str) and r for r in reasons)
            unavailable = BACKENDS[name].unavailable_reason()
            assert (unavailable in reasons) if unavailable else not reasons


def test_a_backend_lacking_a_feature_is_explained_not_skipped_silently(monkeypatch):
    """With no backend serving ALiBi, both automatic and forced dispatch raise naming the feature."""
    limited = Capabilities(device_types=None, dtypes=frozenset({torch.float32}),
                           features=backends.ALL_FEATURES - {"alibi"})
    for backend in BACKENDS.values():
        monkeypatch.setattr(backend, "capabilities", limited)
    q, k, v = _qkv()
    for backend, first_words in ((None, "no backend can serve"), ("torch", "backend 'torch' cannot serve")):
        with pytest.raises(ValueError, match=first_words) as info:
            fused_attention.scaled_dot_product_attention(q, k, v, alibi_slopes=torch.rand(H), backend=backend)
        assert "features not supported: alibi" in str(info.value)
    assert _expected_auto(canonicalize(q, k, v)) == backends.priority("cpu")[0]


def test_info_lists_versions_and_every_backend():
    text = fused_attention.info()
    assert torch.__version__ in text and fused_attention.__version__ in text
    assert "fused_attention._C" in text
    lines = text.split("attention backends:")[1].splitlines()
    for name, backend in BACKENDS.items():
        line = next(line for line in lines if line.split()[:1] == [name])
        reason = backend.unavailable_reason()
        if reason is None:
            assert "available" in line and "unavailable" not in line
        else:
            assert "unavailable" in line and reason in line
    status = _extension.load_extension()
    extension_line = next(line for line in text.splitlines() if "fused_attention._C:" in line)
    assert ("not loaded: " not in extension_line) == status.loaded
    # the position backends per device: "cuda: available" only where a CUDA device is (it said so without)
    position_lines = text.split("position-encoding backends")[1].splitlines()[1:]
    assert position_lines and all("cuda: " in line for line in position_lines)
    if not torch.cuda.is_available():
        assert not any("cuda: available" in line for line in position_lines), position_lines


# One fresh interpreter (each spends ~10 s importing torch on 2 cores): block fused_attention._C, compute,
# then run ``python -m fused_attention info`` (via runpy, exactly as -m does).
_WITHOUT_C = """
import runpy
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "fused_attention._C":
            raise ImportError("blocked by the test")
        return None

sys.meta_path.insert(0, Block())
import torch
import fused_attention

q = torch.randn(1, 2, 3, 8)
out = fused_attention.scaled_dot_product_attention(q, q, q, alibi_slopes=torch.rand(2))
assert out.shape == q.shape and out.isfinite().all()
assert "fused_attention._C" not in sys.modules
sys.argv = ["fused_attention", "info"]
runpy.run_module("fused_attention", run_name="__main__", alter_sys=True)
"""


def test_python_m_info_without_the_compiled_extension():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("FUSED_ATTENTION_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", _WITHOUT_C], check=False,
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert torch.__version__ in out and all(name in out for name in BACKENDS)
    line = next(line for line in out.splitlines() if "fused_attention._C:" in line)
    assert "not loaded: " in line and "blocked by the test" in line
    torch_line = next(line for line in out.split("attention backends:")[1].splitlines()
                      if line.split()[:1] == ["torch"])
    assert "available" in torch_line and "unavailable" not in torch_line


# Fresh interpreters for the two refusals the session cannot show (it has the extension and
# TRITON_INTERPRET=1): triton without the interpreter refuses CPU tensors; cpu without _C is unavailable.
_REFUSALS = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "fused_attention._C":
            raise ImportError("blocked by the test")
        return None

sys.meta_path.insert(0, Block())
import torch
import fused_attention
from fused_attention.backends import BACKENDS

q = torch.randn(1, 2, 3, 8)
for name in ("triton", "cpu"):
    try:
        fused_attention.scaled_dot_product_attention(q, q, q, backend=name)
    except ValueError as exc:
        print(name, "refused:", str(exc).replace(chr(10), " "))
    else:
        print(name, "served the call")
print("auto:", fused_attention.scaled_dot_product_attention(q, q, q).shape == q.shape)
"""


def test_forced_triton_without_interpreter_and_cpu_without_extension_raise_with_reasons():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_ATTENTION_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _REFUSALS], check=False,
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.split()}
    if not torch.cuda.is_available():
        assert "triton refused: backend 'triton' cannot serve" in lines["triton"], result.stdout
        assert "TRITON_INTERPRET" in lines["triton"], result.stdout
    assert "cpu refused: backend 'cpu' cannot serve" in lines["cpu"], result.stdout
    assert "fused_attention._C" in lines["cpu"] and "blocked by the test" in lines["cpu"], result.stdout
    assert lines["auto:"] == "auto: True"


def _profiled_names(**kwargs) -> list[str]:
    q, k, v = _qkv()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused_attention.scaled_dot_product_attention(q, k, v, **kwargs)
    return [event.key for event in prof.key_averages()]


@pytest.mark.parametrize("kwargs", [{}, {"alibi_slopes": torch.linspace(0.1, 1.0, H)}, {"is_causal": True}],
                         ids=["plain", "alibi", "causal"])
def test_profiler_shows_a_fused_attention_name(kwargs):
    names = _profiled_names(**kwargs)
    ours = [n for n in names if n.startswith("fused_attention")]
    assert ours, names
    if "alibi_slopes" in kwargs:  # torch's SDPA has no ALiBi: only our own op can serve it
        assert "fused_attention::torch_sdpa" not in ours


def _restricted_backend(**caps) -> Backend:
    class Restricted(Backend):
        name = "restricted"
        capabilities = Capabilities(
            **{"device_types": None, "dtypes": frozenset({torch.float32}), "max_head_dim": 64,
               "features": backends.ALL_FEATURES - {"alibi"}, **caps}
        )

    return Restricted()


@pytest.mark.parametrize(
    "dtype, e, ev, alibi, expected",
    [
        (torch.float32, 64, 64, False, []),
        (torch.float64, 64, 64, False, ["float64"]),
        (torch.float32, 80, 32, False, ["head dim 80 > 64"]),
        (torch.float32, 32, 72, False, ["value head dim 72 > 64"]),
        (torch.float32, 64, 64, True, ["alibi"]),
        (torch.float64, 80, 32, True, ["float64", "head dim 80 > 64", "alibi"]),
    ],
)
def test_capabilities_give_one_reason_per_violation(dtype, e, ev, alibi, expected):
    q, k, v = _qkv(dtype, e, ev)
    inputs = canonicalize(q, k, v, alibi_slopes=torch.rand(H) if alibi else None)
    reasons = _restricted_backend().not_supported_reasons(inputs)
    assert len(reasons) == len(expected), reasons
    assert all(want in got for want, got in zip(expected, reasons)), reasons


def test_capabilities_device_and_head_dim_multiple():
    q, k, v = _qkv(e=20, ev=24)
    reasons = _restricted_backend(device_types=frozenset({"cuda"}), head_dim_multiple=8).not_supported_reasons(
        canonicalize(q, k, v)
    )
    assert len(reasons) == 2 and "device cpu" in reasons[0] and "head dim 20 is not a multiple of 8" in reasons[1]
