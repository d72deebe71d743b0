"""The ``triton`` backend: FlashAttention-2 style Triton kernels with every feature fused.

It serves CUDA tensors. Under ``TRITON_INTERPRET=1`` (set before the kernels are imported) it also
serves CPU tensors, but only when forced with ``backend="triton"``: that is how CI tests the kernels
without a GPU; automatic dispatch never picks it for CPU tensors (see :mod:`.dispatch`).
"""

from __future__ import annotations

import torch

from ..inputs import AttentionInputs, VarlenInputs
from ..kernels.triton import triton_unavailable_reason
from ..ops.eager import EagerOp, python_direct
from .base import ALL_FEATURES, Backend, Capabilities, dense_op_args, varlen_op_args
from .triton_decode import decode_attention, decode_serves

# Triton's interpreter has computed tl.dot on bfloat16 operands wrongly (on their raw 16-bit patterns):
# bfloat16 on the CPU is served only where a probe (one tiny dot, run once) finds it right.
_INTERPRETER_BF16 = (
    "bfloat16 on the CPU: this Triton interpreter computes tl.dot on bfloat16 wrongly "
    "(a probe dot differs from float32)"
)


class TritonBackend(Backend):
    name = "triton"
    # float64 is left to the other backends: tensor cores have no float64 tl.dot worth launching.
    capabilities = Capabilities(
        device_types=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        features=ALL_FEATURES,
        max_head_dim=256,
        head_dim_multiple=8,
    )

    def unavailable_reason(self) -> str | None:
        reason = triton_unavailable_reason(torch.device("cuda"))  # None whenever Triton imports
        if reason is None and not torch.cuda.is_available() and triton_unavailable_reason(torch.device("cpu")):
            return "no CUDA device is available (CPU tensors need TRITON_INTERPRET=1, the Triton interpreter)"
        return reason

    def serves_device_reason(self, device: torch.device) -> str | None:
        if device.type == "cpu":  # the interpreter, for tests; never chosen automatically
            return triton_unavailable_reason(device)
        return super().serves_device_reason(device)

    def not_supported_reasons(self, inputs: AttentionInputs | VarlenInputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if not reasons and inputs.device.type == "cpu" and inputs.dtype == torch.bfloat16:
            from ..kernels.triton.interpreter_probe import interpreter_bfloat16_dot_ok

            if not interpreter_bfloat16_dot_ok():
                reasons.append(_INTERPRETER_BF16)
        return reasons

    @staticmethod
    def _registered():
        from ..ops import triton_attention  # noqa: F401  (registers the triton_* attention ops on first use)

        return torch.ops.fused_attention

    _eager: tuple[EagerOp, EagerOp] | None = None

    def _eager_ops(self) -> tuple[EagerOp, EagerOp]:
        """The dense and packed ops through :class:`EagerOp`, built on the first eager call."""
        if self._eager is None:
            from ..ops import triton_attention as rules

            ops = self._registered()
            self._eager = (
                EagerOp(ops.triton_attention.default, rules._setup_context, rules._backward,
                        direct=python_direct(rules.triton_attention_impl)),
                EagerOp(ops.triton_varlen.default, rules._varlen_setup_context, rules._varlen_backward,
                        direct=python_direct(rules.triton_varlen_impl)),
            )
        return self._eager

    def attention(self, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        compiling = torch.compiler.is_compiling()
        if not compiling and decode_serves(inputs):  # a decode step: the split-KV kernel
            return decode_attention(inputs)
        args = (*dense_op_args(inputs), inputs.sinks)
        if compiling:  # the registered op is what the compiler traces
            return self._registered().triton_attention(*args)
        return self._eager_ops()[0](*args)

    def varlen_attention(self, inputs: VarlenInputs) -> tuple[torch.Tensor, torch.Tensor]:
        args = (*varlen_op_args(inputs), inputs.max_seqlen_q, inputs.max_seqlen_k, inputs.sinks)
        if torch.compiler.is_compiling():
            return self._registered().triton_varlen(*args)
        return self._eager_ops()[1](*args)


TRITON = TritonBackend()
