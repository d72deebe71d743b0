"""The ``cpu`` backend: the compiled extension's C++ kernels (``csrc/cpu/attention_*``).

Flash-style tiled forward and an exact recomputing backward for every feature, in float32 arithmetic
(float64 for float64 inputs), parallel over batch, heads and query blocks with torch's intra-op threads.
Available whenever ``fused_attention._C`` is built; the default for CPU tensors then.
"""

from __future__ import annotations

import torch

from .. import _extension
from ..inputs import AttentionInputs, VarlenInputs
from ..ops.attention_rules import dense_autograd_rules, varlen_autograd_rules
from ..ops.eager import EagerOp
from .base import (
    ALL_FEATURES,
    Capabilities,
    OpsBackend,
    dense_op_args,
    varlen_op_args,
)

# Loaded once at import: a plain value that torch.compile can read while tracing dispatch.
_EXTENSION = _extension.load_extension()


class _Ops:
    """The extension's attention ops, called through :class:`EagerOp` (no per-call Python autograd)."""

    def __init__(self) -> None:
        ops = torch.ops.fused_attention
        # past the dispatcher when nothing needs it (an extension built before that entry has none)
        from .. import _C  # loaded: _OPS exists only then

        direct = getattr(_C, "attention_direct", None)
        self.attention = EagerOp(
            ops.attention.default, *dense_autograd_rules(ops.attention_backward.default, sinks=True), direct=direct
        )
        # the common call past every Python layer (plain_call.py)
        self.plain = getattr(_C, "attention_plain", None)
        self.varlen_attention = EagerOp(
            ops.varlen_attention.default, *varlen_autograd_rules(ops.varlen_attention_backward.default, sinks=True),
            direct=getattr(_C, "varlen_direct", None),
        )


_OPS = _Ops() if _EXTENSION.loaded and _EXTENSION.cpu_isa_error is None else None


class CpuBackend(OpsBackend):
    name = "cpu"
    capabilities = Capabilities(
        device_types=frozenset({"cpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        features=ALL_FEATURES,
    )

    def unavailable_reason(self) -> str | None:
        if not _EXTENSION.loaded:
            return _EXTENSION.reason
        return _EXTENSION.cpu_isa_error

    def attention(self, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        assert _OPS is not None, "dispatch only picks the cpu backend when the extension loaded"
        return _OPS.attention(*dense_op_args(inputs, sinks=True))

    def varlen_attention(self, inputs: VarlenInputs) -> tuple[torch.Tensor, torch.Tensor]:
        assert _OPS is not None, "dispatch only picks the cpu backend when the extension loaded"
        return _OPS.varlen_attention(*varlen_op_args(inputs, sinks=True))


CPU = CpuBackend()
