"""torch's mask conventions for the modules: bool/float masks, key padding, causal arguments.

Masks here are in SDPA's convention: bool True = attend, float = added to the score."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .checks import ModuleTypeError


def _check_mask_type(mask: object, name: str, other: Tensor | None = None, other_name: str = "") -> None:
    """torch's rules (``F._canonical_mask``): bool or floating masks only; mixing types warns."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise ModuleTypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ModuleTypeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")
    if other is not None and other.dtype != mask.dtype:
        warnings.warn(
            f"Support for mismatched {name} and {other_name} is deprecated. Use same type for both instead.",
            stacklevel=3,
        )


def _attend(ignore_mask: Tensor) -> Tensor:
    """torch.nn's mask convention (bool True = ignore; float added) to SDPA's (bool True = attend)."""
    return ignore_mask.logical_not() if ignore_mask.dtype == torch.bool else ignore_mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _combine(mask: Tensor | None, other: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """One SDPA-convention mask that applies both (AND for bools, sum otherwise, as torch adds them)."""
    if mask is None or other is None:
        combined = other if mask is None else mask
    elif mask.dtype == torch.bool and other.dtype == torch.bool:
        combined = mask & other
    else:
        combined = _additive(mask, dtype) + _additive(other, dtype)
    if combined is not None and combined.is_floating_point() and combined.dtype not in (torch.float32, dtype):
        combined = combined.to(dtype)  # the kernels take float32 or the query dtype
    return combined


def _pad_keys(mask: Tensor, extra: int) -> Tensor:
    """Appends ``extra`` visible key columns (torch pads its masks this way for bias_kv / zero_attn)."""
    fill = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
    return torch.cat([mask, fill(*mask.shape[:-1], extra)], dim=-1)


def padding_lengths(key_padding_mask: Tensor) -> tuple[bool, Tensor | None]:
    """Whether ``key_padding_mask`` (``(B, S)``, True or ``-inf`` = padding) only pads on the right, and if
    so the number of real keys per row (``None`` when nothing is padded).

    Reading the mask costs a device sync on GPUs and a graph break under ``torch.compile``, so only CPU
    masks in eager mode are read; otherwise ``(False, None)``, and the caller applies the mask as is (a
    broadcast ``(B, 1, 1, S)`` mask: still never an ``L x S`` tensor). A float mask counts when it holds
    only 0 and ``-inf`` (what ``torch.nn.TransformerEncoderLayer`` turns a bool mask into).
    """
    mask = key_padding_mask
    if mask.device.type != "cpu" or torch.compiler.is_compiling() or mask.requires_grad:
        return False, None
    if mask.dtype == torch.bool:
        ignored = mask
    else:
        ignored = mask == float("-inf")
        if not bool((ignored | (mask == 0)).all()):
            return False, None
    seq = ignored.shape[-1]
    lengths = seq - ignored.sum(-1)
    if not torch.equal(ignored, torch.arange(seq, device=ignored.device) >= lengths.unsqueeze(-1)):
        return False, None
    return True, (None if bool((lengths == seq).all()) else lengths)


def _padding(key_padding_mask: Tensor | None, extra_keys: int = 0) -> tuple[Tensor | None, Tensor | None]:
    """``(mask, key_lengths)`` for a torch.nn-convention ``(B, S)`` key padding mask: the lengths when
    it is pure right padding (and no extra key follows the padding), else a ``(B, 1, 1, S)`` mask."""
    if key_padding_mask is None:
        return None, None
    if not extra_keys:
        right_padded, lengths = padding_lengths(key_padding_mask)
        if right_padded:
            return None, lengths
    mask = _attend(key_padding_mask)
    if extra_keys:
        mask = _pad_keys(mask, extra_keys)
    return mask[:, None, None, :], None


def _causal_kwargs(
    mask: Tensor | None, seq_q: int, seq_k: int, device: torch.device
) -> tuple[dict[str, object], Tensor | None]:
    """Top-left causal attention as SDPA arguments. ``is_causal`` cannot be combined with a mask, but an
    equal bottom-right window can when ``L >= S``; otherwise the rule is folded into the mask."""
    if mask is None:
        return {"is_causal": True}, None
    if seq_q >= seq_k:
        return {"window_size": (-1, seq_q - seq_k)}, mask
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril()
    return {}, _combine(mask, visible, mask.dtype if mask.is_floating_point() else torch.float32)


def _attention_scores(
    q: Tensor, k: Tensor, mask: Tensor | None, key_lengths: Tensor | None, causal: bool, slopes: Tensor | None
) -> Tensor:
    """``q k^T / sqrt(E)`` with the bias and every mask applied, ``(B, H, L, S)``, in float32 (float64 for
    float64): the scores the kernel normalised, so ``exp(scores - lse)`` are its softmax weights."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    # One (B, H, L, S) tensor, updated in place: no step's backward needs the scores it overwrites. q is
    # scaled before the product, as torch's module does (one pass over L x E, not over L x S). Contiguous
    # factors give contiguous scores: the softmax over a strided L x S is 3x slower.
    q = (q.to(compute) * (1.0 / math.sqrt(q.shape[-1]))).contiguous()
    scores = torch.matmul(q, k.to(compute).contiguous().transpose(-2, -1))
    seq_q, seq_k = scores.shape[-2:]
    if slopes is not None:  # ALiBi, bottom-right aligned as in scaled_dot_product_attention
        rows = torch.arange(seq_q, device=q.device).unsqueeze(1) + (seq_k - seq_q)
        distance = (rows - torch.arange(seq_k, device=q.device)).abs().to(compute)
        scores.sub_(slopes.to(compute).view(1, -1, 1, 1) * distance)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask.to(compute))
    if key_lengths is not None:
        padded = torch.arange(seq_k, device=q.device) >= key_lengths.view(-1, 1, 1, 1)
        scores.masked_fill_(padded, float("-inf"))
    if causal:
        future = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).triu(1)
        scores.masked_fill_(future, float("-inf"))
    return scores
