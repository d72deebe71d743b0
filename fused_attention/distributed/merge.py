"""Merging partial attention results through their log-sum-exp.

Two partial results over disjoint key sets, ``(out_a, lse_a)`` and ``(out_b, lse_b)``, combine exactly:
``lse = log(exp(lse_a) + exp(lse_b))``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: the precision partial results are merged in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_into_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merges ``(out (..., L, Ev), lse (..., L))`` into the accumulators, in place.

    The accumulators are in :func:`accumulation_dtype`; ``out`` may be lower precision. A side whose lse
    is -inf (it saw no key) contributes nothing; when both are -inf the row stays 0 with lse -inf (no NaN).
    """
    lse = lse.to(acc_lse.dtype)
    top = torch.maximum(acc_lse, lse)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    w_acc = torch.exp(acc_lse - top)
    w_new = torch.exp(lse - top)
    total = w_acc + w_new
    safe = torch.where(total == 0, torch.ones_like(total), total)
    acc_out.mul_((w_acc / safe).unsqueeze(-1)).add_(out.to(acc_out.dtype) * (w_new / safe).unsqueeze(-1))
    acc_lse.copy_(top + torch.log(total))


def merge_attention_states(
    outs: list[torch.Tensor], lses: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over the union of disjoint key sets, from each set's ``(out, lse)``.

    Args:
        outs: partial outputs ``(..., L, Ev)``, all the same shape and dtype.
        lses: their log-sum-exps ``(..., L)`` (as returned with ``return_lse=True``); -inf for rows that
            saw no key.

    Returns:
        ``(out, lse)``: ``out`` in the outputs' dtype, ``lse`` in float32 (float64 for float64 outputs).
        Merging is done in that precision; rows that no part saw give 0 and -inf.
    """
    if not outs or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty and equally long, got {len(outs)} and {len(lses)}")
    acc_dtype = accumulation_dtype(outs[0].dtype)
    acc_out = outs[0].to(acc_dtype, copy=True)
    acc_lse = lses[0].to(acc_dtype, copy=True)
    for out, lse in zip(outs[1:], lses[1:], strict=True):
        merge_into_(acc_out, acc_lse, out, lse)
    return acc_out.to(outs[0].dtype), acc_lse
