"""Loads the compiled extension ``fused_attention._C`` when it was built, and says why not otherwise.

Importing ``_C`` runs its ``TORCH_LIBRARY(fused_attention, ...)`` registrations, which put the C++ ops
under ``torch.ops.fused_attention``. Their fake (meta) and autograd rules live here, in Python, so
``torch.compile`` can trace the ops. Nothing here ever raises: a missing or broken build only makes the
``cpu`` and ``cuda`` backends unavailable, with the reason below.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ExtensionStatus:
    """Whether ``fused_attention._C`` loaded, why (not), and whether its CUDA kernels were compiled in."""

    loaded: bool
    reason: str
    has_cuda: bool
    cpu_isa: str = ""  # instruction set the CPU attention kernels run with (baseline, avx2, avx512, avx512bf16, amx)
    cpu_isa_error: str | None = None  # why they cannot run (a FUSED_ATTENTION_CPU_ISA this CPU or build lacks)
    cpu_isa_reason: str = ""  # why that one (the best supported, asked for, or preferred on this CPU)


@functools.cache
def load_extension() -> ExtensionStatus:
    """Imports ``fused_attention._C`` once and registers the Python-side rules of its ops."""
    try:
        from . import _C
    except (ImportError, OSError) as exc:
        return ExtensionStatus(False, _build_failure() or _import_failure(exc), False)
    except Exception as exc:  # noqa: BLE001 - a broken build must not break `import fused_attention`
        return ExtensionStatus(
            False, f"compiled extension fused_attention._C failed to load: {type(exc).__name__}: {exc}", False
        )
    try:
        _register_python_rules()
    except Exception as exc:  # noqa: BLE001 - e.g. a stale _C built from other schemas
        return ExtensionStatus(
            False, f"fused_attention._C loaded but its ops could not be registered: {exc}", False
        )
    has_cuda = bool(getattr(_C, "with_cuda", False))
    kernels = "C++ and CUDA kernels" if has_cuda else "C++ kernels only (built without CUDA)"
    try:
        isa, isa_error, isa_reason = _C.cpu_attention_isa(), None, _C.cpu_attention_isa_reason()
    except RuntimeError as exc:  # a bad FUSED_ATTENTION_CPU_ISA: the cpu backend says so, the import goes on
        isa, isa_error, isa_reason = "", str(exc).splitlines()[0], ""
    return ExtensionStatus(True, f"loaded from {_C.__file__}: {kernels}", has_cuda, isa, isa_error, isa_reason)


# Where setup.py records why it built no extension (a build failure never fails the install).
_BUILD_FAILURE_NOTE = Path(__file__).with_name("_C_build_failure.txt")


def _build_failure() -> str | None:
    """Why the install built no extension, as setup.py recorded it (None: no record)."""
    try:
        return _BUILD_FAILURE_NOTE.read_text().strip() or None
    except OSError:
        return None


def _import_failure(exc: BaseException) -> str:
    try:
        missing = importlib.util.find_spec(f"{__package__}._C") is None
    except (ImportError, ValueError):  # an import hook that refuses it: report its own error below
        missing = False
    if missing:
        return (
            f"compiled extension fused_attention._C is not built (no _C library in {Path(__file__).parent}); "
            "build it with `pip install --no-build-isolation .`"
        )
    return f"compiled extension fused_attention._C cannot be loaded (built for another torch?): {exc}"


def _register_python_rules() -> None:
    _register_position_rules()
    _register_attention_rules()


def _register_position_rules() -> None:
    from .ops.position_rules import register_position_autograd

    # The kernels allocate with empty_like(x): x's stride order when x is dense.
    @torch.library.register_fake("fused_attention::add_sinusoidal_position_encoding")
    def _(x: torch.Tensor, offsets: torch.Tensor | None, offset: int, base: float) -> torch.Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("fused_attention::rotary")
    def _(x, cos, sin, positions, interleaved: bool, conjugate: bool) -> torch.Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("fused_attention::rotary_")
    def _(x, cos, sin, positions, interleaved: bool, conjugate: bool) -> None:
        return None

    @torch.library.register_fake("fused_attention::rotary_qk")
    def _(q, k, cos, sin, positions, interleaved: bool, conjugate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty_like(q), torch.empty_like(k)

    # (The in-place rotary_ gets its autograd in Python, from an autograd.Function around it.)
    register_position_autograd(
        "fused_attention::rotary", "fused_attention::rotary_qk", "fused_attention::add_sinusoidal_position_encoding"
    )


def _register_attention_rules() -> None:
    from .ops import attention_rules

    ops = torch.ops.fused_attention
    torch.library.register_fake("fused_attention::attention")(attention_rules.dense_fake)
    torch.library.register_fake("fused_attention::attention_backward")(attention_rules.dense_sinks_backward_fake)
    torch.library.register_fake("fused_attention::varlen_attention")(attention_rules.varlen_fake)
    torch.library.register_fake("fused_attention::kvcache_attention")(attention_rules.dense_fake)
    torch.library.register_fake("fused_attention::kvcache_append_attention_")(
        lambda k_cache, v_cache, k, v, q, *_: attention_rules.dense_fake(q, k_cache, v_cache)
    )
    torch.library.register_fake("fused_attention::attention_precise_lse")(attention_rules.precise_lse_fake)
    torch.library.register_fake("fused_attention::attention_backward_from_stats")(
        attention_rules.backward_from_stats_fake
    )
    torch.library.register_fake("fused_attention::varlen_attention_backward")(
        attention_rules.varlen_sinks_backward_fake
    )
    attention_rules.register_dense_autograd("fused_attention::attention", ops.attention_backward, sinks=True)
    attention_rules.register_varlen_autograd(
        "fused_attention::varlen_attention", ops.varlen_attention_backward, sinks=True
    )
