"""Decode steps through the ``triton`` backend's split-KV kernel.

Hugging Face's ``generate`` sends each decode step (a few query rows against the whole cache) through the
regular ``scaled_dot_product_attention``. The regular kernel gives such a call one program per (batch,
query head, 64 rows), so a batch of one with 8 KV heads would keep 32 of an H200's 132 SMs busy reading
K and V once per query head. The KV cache's split-KV kernel (:mod:`..kernels.triton.kvcache_decode`)
reads each KV head's keys once for its whole query-head group and splits the keys over enough programs
to fill the GPU, merging the splits through their lse. This module hands it the calls it computes
exactly as the regular kernel would: inference (no gradient wanted), at most ``MAX_ROWS`` query rows,
at least ``MIN_KEYS`` keys, no mask, no dropout, no top-left causal rule, and ``key_lengths`` only
without a window or ALiBi (the decode kernel measures positions from each entry's key count, the
regular call from ``S``), on plain tensors with no dispatch or torch function mode on (the kernel is
launched directly, so tracers and fake tensors must see the registered op).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..inputs import AttentionInputs

MAX_ROWS = 16
MIN_KEYS = 256


def decode_serves(inputs: AttentionInputs) -> bool:
    """Whether the split-KV kernel computes this call exactly as the regular kernel would."""
    seq_q, seq_k = inputs.query.shape[2], inputs.key.shape[2]
    if seq_q > MAX_ROWS or seq_k < MIN_KEYS or inputs.attn_mask is not None or inputs.dropout_p or inputs.causal:
        return False
    positional = inputs.window_left >= 0 or inputs.window_right >= 0 or inputs.alibi_slopes is not None
    if inputs.key_lengths is not None and positional:
        return False
    tensors = tuple(t for t in (inputs.query, inputs.key, inputs.value, inputs.alibi_slopes, inputs.sinks) if t is not None)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    # The kernel launches directly: tracers, fake tensors and modes get the registered op instead.
    plain = all(type(t) is torch.Tensor for t in tensors)
    return plain and not torch._C._has_torch_function(tensors) and _get_current_dispatch_mode() is None


def decode_attention(inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, L, Ev) in q's dtype, lse (B, Hq, L) float32)``, as the regular triton op returns."""
    from ..kernels.triton.kvcache_combine import kvcache_combine
    from ..kernels.triton.kvcache_decode import default_splits, kvcache_decode

    q, k, v = inputs.query, inputs.key, inputs.value
    batch, kv_heads, seq_k = k.shape[0], k.shape[1], k.shape[2]
    # Each batch entry is one page of S keys: (B, S, Hkv, D) views, a table of row numbers.
    table = torch.arange(batch, device=q.device, dtype=torch.int32).view(batch, 1)
    total = (
        inputs.key_lengths.to(device=q.device, dtype=torch.int32).clamp(0, seq_k)
        if inputs.key_lengths is not None
        else torch.full((batch,), seq_k, device=q.device, dtype=torch.int32)
    )
    outs, lses = kvcache_decode(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), table, total, contiguous=True,
        num_splits=default_splits(batch, kv_heads, seq_k, q.device), scale=inputs.scale, is_causal=False,
        window=(inputs.window_left, inputs.window_right), softcap=inputs.softcap or None,
        alibi_slopes=inputs.alibi_slopes, leftpad=None,
    )
    return kvcache_combine(outs, lses, inputs.sinks, q)
