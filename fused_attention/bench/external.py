"""FlashAttention (``flash_attn``) and xformers as providers when installed (never required), on CUDA.
Both take ``(B, L, H, D)``; what they cannot express gets a reason instead of a row of numbers.
Not run in this project's CI (neither package is installed there, and both need a GPU)."""

from __future__ import annotations

import importlib.util

import torch

from .case import Case
from .provider import Provider

_HALF = (torch.float16, torch.bfloat16)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _bshd(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(1, 2) for t in tensors]


def _flash_attn(case: Case) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    spec, kwargs = case.spec, case.kwargs
    if case.is_varlen:
        n, cu = max(spec.seq_lengths), case.cu_seqlens
        return flash_attn_varlen_func(case.query, case.key, case.value, cu, cu, n, n, causal=True)
    extra = {}
    if "window_size" in kwargs:
        extra["window_size"] = kwargs["window_size"]
    if "alibi_slopes" in kwargs:
        extra["alibi_slopes"] = kwargs["alibi_slopes"]
    if "softcap" in kwargs:
        extra["softcap"] = kwargs["softcap"]
    q, k, v = _bshd(case.query, case.key, case.value)  # GQA by head counts, natively
    out = flash_attn_func(q, k, v, causal=case.is_causal, **extra)
    return out.transpose(1, 2)


def _flash_attn_reasons(case: Case) -> list[str]:
    reasons = []
    if case.query.dtype not in _HALF:
        reasons.append(f"flash_attn takes float16/bfloat16, got {case.query.dtype}")
    if case.spec.op in ("padding", "mask"):
        reasons.append(f"flash_attn has no {'key_lengths' if case.spec.op == 'padding' else 'dense float mask'}")
    if case.spec.op == "sinks":
        reasons.append("the flash-attn provider does not express sinks")
    return reasons


def _xformers(case: Case) -> torch.Tensor:
    import xformers.ops as xops

    if case.is_varlen:
        bias = xops.fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(list(case.spec.seq_lengths))
        q, k, v = (t.unsqueeze(0) for t in case.grad_inputs())
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)[0]
    q, k, v = _bshd(case.query, case.key, case.value)
    if case.is_causal:
        bias = xops.LowerTriangularMask()
    else:  # the dense form, as an additive bias in the query dtype (-inf where a bool mask hides)
        mask = case.dense_mask()
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        bias = None if mask is None else mask.expand(shape)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias).transpose(1, 2)


def _xformers_reasons(case: Case) -> list[str]:
    if case.spec.op in ("softcap", "gqa", "sinks", "decode"):
        return [f"the xformers provider does not express {case.spec.op}"]
    return []


def external_providers(device: str) -> list[Provider]:
    """``flash-attn`` and ``xformers`` providers for CUDA devices, for the packages that are installed."""
    if torch.device(device).type != "cuda":
        return []
    providers = []
    if _installed("flash_attn"):
        providers.append(Provider("flash-attn", _flash_attn, _flash_attn_reasons))
    if _installed("xformers"):
        providers.append(Provider("xformers", _xformers, _xformers_reasons, extra_bytes=Case.extra_bytes))
    return providers
