"""FlexAttention (``torch.nn.attention.flex_attention``, compiled) as a provider, where the installed
torch has it: every op as a ``score_mod`` and a block mask built once per case, outside the timing.
Its compile is its warm-up, so ``--quick`` leaves it out."""

from __future__ import annotations

from typing import Any

import torch

from .case import Case
from .provider import Provider

_COMPILED: dict[str, Any] = {}
RECOMPILE_LIMIT = 256  # one compile per shape and mode; dynamo's default (8) would fall back to eager


def _flex() -> tuple[Any, Any]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"], create_block_mask


def _mods(case: Case) -> tuple[Any, Any]:
    """``(score_mod, mask_mod)`` for the op (None where it has none); positions bottom-right."""
    spec = case.spec
    offset = spec.seq_k - spec.seq_q
    kwargs = case.kwargs
    score_mod = mask_mod = None
    if spec.op == "causal":
        mask_mod = lambda b, h, q, k: q >= k
    elif spec.op == "window":
        left = spec.window_size[0]
        mask_mod = lambda b, h, q, k: (k <= q + offset) & (k >= q + offset - left)
    elif spec.op == "padding":
        lengths = kwargs["key_lengths"]
        mask_mod = lambda b, h, q, k: k < lengths[b]
    elif spec.op == "varlen":
        doc = torch.repeat_interleave(
            torch.arange(spec.batch, device=spec.device), torch.tensor(spec.seq_lengths, device=spec.device)
        )
        mask_mod = lambda b, h, q, k: (doc[q] == doc[k]) & (q >= k)
    elif spec.op == "alibi":
        slopes = kwargs["alibi_slopes"]
        score_mod = lambda s, b, h, q, k: s - slopes[h] * (q + offset - k).abs()
    elif spec.op == "softcap":
        cap = kwargs["softcap"]
        score_mod = lambda s, b, h, q, k: cap * torch.tanh(s / cap)
    elif spec.op == "mask":
        mask = kwargs["attn_mask"]
        score_mod = lambda s, b, h, q, k: s + mask[0, 0, q, k]
    return score_mod, mask_mod


def _call(case: Case) -> torch.Tensor:
    flex, create_block_mask = _flex()
    key = "flex"
    if key not in case._dense:  # the block mask: built once per case, outside the timing
        score_mod, mask_mod = _mods(case)
        length = case.query.shape[0] if case.is_varlen else case.spec.seq_q
        block_mask = None
        if mask_mod is not None:
            batch = 1 if case.is_varlen else case.spec.batch
            block_mask = create_block_mask(mask_mod, batch, None, length, length, device=case.spec.device)
        case._dense[key] = (score_mod, block_mask)
    score_mod, block_mask = case._dense[key]
    q, k, v = case.grad_inputs()
    if case.is_varlen:  # packed (total, H, D) -> one (1, H, total, D) sequence with a document mask
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{limit_name: RECOMPILE_LIMIT}):
        out = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=case.enable_gqa)
    return out[0].transpose(0, 1) if case.is_varlen else out


def flex_provider() -> list[Provider]:
    """``[flex]`` when this torch has FlexAttention (CPU and CUDA), else ``[]``."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return []
    return [Provider("flex", _call, _reasons, slow_warmup=True)]


def _reasons(case: Case) -> list[str]:
    # a sink is a column no score_mod can add (it would need the lse), so it is not expressed here
    return ["the flex provider does not express sinks"] if case.spec.op == "sinks" else []
