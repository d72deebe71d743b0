"""The ``torch`` backend: pure PyTorch, every feature, any device and dtype torch supports.

For inference calls that torch serves natively with a fused kernel it calls torch's own SDPA (faster
there, and just as lean); everything else runs the query-chunked custom op, whose memory is O(chunk x S).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..inputs import AttentionInputs, VarlenInputs
from ..ops import torch_attention as _ops  # (registers fused_attention::torch_attention)
from ..ops import torch_varlen as _varlen_ops  # (registers fused_attention::torch_varlen)
from ..ops.attention_rules import dense_autograd_rules, varlen_autograd_rules
from ..ops.eager import EagerOp, python_direct
from .base import (
    ALL_FEATURES,
    Capabilities,
    OpsBackend,
    dense_op_args,
    requires_grad,
    varlen_op_args,
)

# Features torch's SDPA expresses natively; anything else needs the chunked op.
_NATIVE_FEATURES = frozenset({"causal", "bool_mask", "float_mask", "gqa", "value_head_dim"})
_SDPA_MATH = 0  # torch's SDPBackend.MATH: torch would materialize L x S, so the chunked op is leaner
_ATTENTION = EagerOp(
    torch.ops.fused_attention.torch_attention.default,
    *dense_autograd_rules(torch.ops.fused_attention.torch_attention_backward.default, sinks=True),
    direct=python_direct(_ops.torch_attention_impl),
)
_VARLEN = EagerOp(
    torch.ops.fused_attention.torch_varlen.default,
    *varlen_autograd_rules(torch.ops.fused_attention.torch_varlen_backward.default, sinks=True),
    direct=python_direct(_varlen_ops.torch_varlen_impl),
)


def _torch_serves_fused(inputs: AttentionInputs) -> bool:
    """Inference calls that torch runs with a fused kernel. Training stays on the chunked op, whose
    backward rounds as the softmax formula does (torch's fused backwards round differently)."""
    if not inputs.features <= _NATIVE_FEATURES or torch.compiler.is_compiling() or requires_grad(inputs):
        return False
    mask = inputs.attn_mask
    if mask is not None and inputs.query.dtype == torch.float64 and mask.dtype == torch.float32:
        return False  # torch's CPU flash kernel reads such a mask wrongly (errors of 2 and more, torch 2.14)
    try:
        choice = torch._fused_sdp_choice(
            inputs.query, inputs.key, inputs.value, inputs.attn_mask, 0.0, inputs.causal, scale=inputs.scale,
            enable_gqa="gqa" in inputs.features,
        )
    except (RuntimeError, TypeError, AttributeError):
        return False
    return int(choice) != _SDPA_MATH and int(choice) >= 0


class TorchBackend(OpsBackend):
    ops_prefix = "torch_"
    name = "torch"
    capabilities = Capabilities(
        device_types=None,
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        features=ALL_FEATURES,
    )

    def attention(self, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if _torch_serves_fused(inputs):
            with torch.profiler.record_function("fused_attention::torch_sdpa"):
                out = F.scaled_dot_product_attention(
                    inputs.query, inputs.key, inputs.value, attn_mask=inputs.attn_mask,
                    is_causal=inputs.causal, scale=inputs.scale, enable_gqa="gqa" in inputs.features,
                )
            return out, None
        return _ATTENTION(*dense_op_args(inputs, sinks=True))

    def varlen_attention(self, inputs: VarlenInputs) -> tuple[torch.Tensor, torch.Tensor]:
        return _VARLEN(*varlen_op_args(inputs, sinks=True))


TORCH = TorchBackend()
