"""Validation of packed variable-length (``varlen_attention``) arguments into a :class:`VarlenInputs`."""

from __future__ import annotations

import torch

from .argument_checks import (
    check_alibi,
    check_bool,
    check_cu_seqlens,
    check_dropout,
    check_max_seqlen,
    check_qkv_types,
    check_scale,
    check_sinks,
    check_softcap,
    check_window,
)
from .errors import AttentionArgumentError
from .inputs import VarlenInputs


def canonicalize_varlen(
    q: object,
    k: object,
    v: object,
    cu_seqlens_q: object,
    cu_seqlens_k: object,
    max_seqlen_q: object,
    max_seqlen_k: object,
    *,
    dropout_p: object = 0.0,
    scale: object = None,
    is_causal: object = False,
    window_size: object = None,
    alibi_slopes: object = None,
    softcap: object = None,
    return_lse: object = False,
    sinks: object = None,
) -> VarlenInputs:
    """Validates ``varlen_attention`` arguments into a :class:`VarlenInputs`."""
    check_qkv_types(q, k, v, names=("q", "k", "v"))
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise AttentionArgumentError(f"{name} must be packed (total, heads, dim), got {t.dim()} dimensions")
    if q.shape[-1] != k.shape[-1]:
        raise AttentionArgumentError(f"k head dim {k.shape[-1]} must equal q head dim {q.shape[-1]}")
    if k.shape[:2] != v.shape[:2]:
        raise AttentionArgumentError(
            f"v must have the tokens and heads of k {tuple(k.shape[:2])}, got {tuple(v.shape[:2])}"
        )
    if k.shape[1] == 0 and q.shape[1] > 0 or k.shape[1] > 0 and q.shape[1] % k.shape[1]:
        raise AttentionArgumentError(f"k heads ({k.shape[1]}) must divide q heads ({q.shape[1]})")
    cu_q, longest_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    cu_k, longest_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_q.numel() != cu_k.numel():
        raise AttentionArgumentError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length, got {cu_q.numel()} and {cu_k.numel()}"
        )
    check_bool("is_causal", is_causal)
    check_bool("return_lse", return_lse)
    window_left, window_right = check_window(window_size)
    if is_causal:
        window_right = 0 if window_right == -1 else min(window_right, 0)
    batch = cu_q.numel() - 1
    alibi = check_alibi(alibi_slopes, batch, q.shape[1], q.device)
    dropout = check_dropout(dropout_p)
    sink_logits = check_sinks(sinks, q.shape[1], q.device)
    features = {"varlen", "sinks"} if sink_logits is not None else {"varlen"}
    for name, on in (
        ("window", window_left >= 0 or window_right >= 0),
        ("alibi", alibi is not None),
        ("softcap", softcap is not None),
        ("dropout", dropout > 0),
        ("gqa", k.shape[1] != q.shape[1]),
        ("lse", return_lse),
        ("value_head_dim", v.shape[-1] != q.shape[-1]),
    ):
        if on:
            features.add(name)
    return VarlenInputs(
        query=q,
        key=k,
        value=v,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=check_max_seqlen("max_seqlen_q", max_seqlen_q, longest_q),
        max_seqlen_k=check_max_seqlen("max_seqlen_k", max_seqlen_k, longest_k),
        causal_lower_right=is_causal,
        window_left=window_left,
        window_right=window_right,
        alibi_slopes=alibi,
        softcap=check_softcap(softcap, q.dtype),
        dropout_p=dropout,
        scale=check_scale(scale, q.shape[-1]),
        return_lse=return_lse,
        features=frozenset(features),
        sinks=sink_logits,
    )
