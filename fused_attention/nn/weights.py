"""Attention weights for ``need_weights``: rebuilt from the kernel's lse, with or without sinks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .checks import ModuleTypeError


class _WeightsFromLse(torch.autograd.Function):
    """``softmax(scores)`` rebuilt from the kernel's log-sum-exp, ``exp(scores - lse)``: the lse replaces
    the softmax's row-max pass. The rounding of a float32 lse (about ``|lse| * eps``) would scale a whole
    row by ``1 + O(|lse| eps)``, so each row is renormalised by its sum (a pass a softmax makes too),
    which keeps the weights as accurate as torch's softmax. Rows that see no key get 0 (not NaN). The
    backward is the softmax backward, so gradients through the returned weights are exact."""

    @staticmethod
    def forward(ctx, scores: Tensor, lse: Tensor) -> Tensor:
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # empty rows: exp(-inf - inf) = 0
        weights = (scores - lse.unsqueeze(-1)).exp_()
        weights = weights.div_(weights.sum(-1, keepdim=True).clamp_(min=torch.finfo(weights.dtype).tiny))
        ctx.save_for_backward(weights)
        return weights

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (weights,) = ctx.saved_tensors
        return weights * (grad - (grad * weights).sum(-1, keepdim=True)), None


def _safe_softmax(scores: Tensor, may_hide_rows: bool = True) -> Tensor:
    """Softmax whose rows that see no key are 0 (as the kernels give), not NaN. ``may_hide_rows=False``
    (no mask, padding or causal rule) skips the search for such rows."""
    weights = torch.softmax(scores, dim=-1)
    if not may_hide_rows:
        return weights
    return weights.masked_fill(torch.isneginf(scores.amax(-1, keepdim=True)), 0.0)


def _softmax_with_sinks(scores: Tensor, sinks: Tensor) -> Tensor:
    """The attention weights with learned sinks: the softmax over the scores and one more column per
    row, the head's sink logit, which is then dropped (so a row sums to ``1 - p_sink``)."""
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return _safe_softmax(torch.cat([scores, sink], dim=-1))[..., :-1]


def _check_sinks_flag(enabled: object) -> None:
    if not isinstance(enabled, bool):
        raise ModuleTypeError(f"sinks must be a bool, got {type(enabled).__name__}")


def _sink_parameter(enabled: object, num_heads: int, device) -> nn.Parameter | None:
    """A learned sink logit per head (float32, zero-initialised), or None: off, it is no parameter at
    all, so state_dicts stay those of the modules without sinks."""
    _check_sinks_flag(enabled)
    return nn.Parameter(torch.zeros(num_heads, device=device, dtype=torch.float32)) if enabled else None


def _sink_logits(sinks: nn.Parameter | None) -> Tensor | None:
    """The sinks as the functional API takes them (float32 or float64, even in a 16-bit module)."""
    if sinks is None or sinks.dtype in (torch.float32, torch.float64):
        return sinks
    return sinks.float()
