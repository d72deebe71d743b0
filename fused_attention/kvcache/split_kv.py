"""The split-KV decode kernel behind ``attention_with_kvcache`` where the ``triton`` backend serves the
call: the cache is read in place (pages through the block table, nothing gathered), the query heads of a
KV group share each K/V read, and the key splits merge exactly through their lse."""

from __future__ import annotations

import torch

from ..backends.base import Backend, decision_cache
from ..backends.dispatch import automatic_dispatch, decision_key, select
from ..inputs import AttentionInputs, _features, canonicalize
from .paged import page_table
from .validate import KVCacheCall


def probe_features(call: KVCacheCall) -> frozenset[str]:
    """The features of the regular attention call :func:`attention_backend` probes with (its
    ``AttentionInputs.features``), worked out without building it."""
    return _features(
        causal=False, window=call.window != (-1, -1), alibi=call.alibi_slopes is not None,
        softcap=call.softcap is not None, key_lengths=False, mask=None, dropout=False,
        gqa=call.q.shape[2] != call.k_cache.shape[2], lse=True, value_head_dim=call.v_cache.shape[-1] != call.q.shape[-1],
        sinks=call.sinks is not None,
    )


def attention_backend(call: KVCacheCall, backend: str | None) -> Backend:
    """The backend the regular attention would pick for this call (raising, as it would, when a forced
    one cannot serve it). Dispatch reads only devices, dtypes, head dims and features, so a one-key view
    of the cache stands in for the keys (a paged cache is never gathered for this); a repeated automatic
    choice comes from the dispatcher's cache without building the probe."""
    if automatic_dispatch(backend):
        key = decision_key(call.q, call.v_cache.shape[-1], probe_features(call), False)
        chosen = decision_cache.get(key)
        if chosen is not None:
            return chosen
    return select(probe(call), backend)


def probe(call: KVCacheCall) -> AttentionInputs:
    """The regular attention call that stands for this one in dispatch: one key per batch entry, of the
    caches' dtype and device (fresh, so that an empty page pool stands in as well as a full one)."""
    batch, heads_kv = call.q.shape[0], call.k_cache.shape[2]
    k = call.k_cache.new_empty(batch, heads_kv, 1, call.k_cache.shape[-1])
    v = call.v_cache.new_empty(batch, heads_kv, 1, call.v_cache.shape[-1])
    slopes = call.alibi_slopes  # (1 or B, Hq); canonicalize wants (Hq,) or (B, Hq)
    if slopes is not None and slopes.shape[0] == 1:
        slopes = slopes[0]
    return canonicalize(
        call.q.transpose(1, 2), k, v, enable_gqa=call.q.shape[2] != k.shape[1], window_size=call.window,
        alibi_slopes=slopes, softcap=call.softcap, scale=call.scale, return_lse=True, sinks=call.sinks,
    )


def split_kv_attention(call: KVCacheCall, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` from the Triton split-KV kernel; ``q`` ``(B, Lq, Hq, D)``
    rotated, the caches already holding the appended keys."""
    from ..kernels.triton.kvcache_combine import kvcache_combine
    from ..kernels.triton.kvcache_decode import default_splits, kvcache_decode

    k_cache, v_cache = call.k_cache, call.v_cache
    batch = q.shape[0]
    table = page_table(call)
    total = call.seqlens + call.new_len
    # At most one split per key, as on the other backends: each split is a program and a slice of the partial
    # results (num_splits=2**64 failed to allocate them; on a GPU, 65536 would pass the grid's limit).
    splits = min(call.num_splits, max(1, call.capacity)) or default_splits(batch, k_cache.shape[2], call.capacity, q.device)
    outs, lses = kvcache_decode(
        q, k_cache, v_cache, table, total, contiguous=call.block_table is None, num_splits=splits, scale=call.scale, is_causal=call.is_causal,
        window=call.window, softcap=call.softcap, alibi_slopes=call.alibi_slopes, leftpad=call.leftpad,
    )
    return kvcache_combine(outs, lses, call.sinks, q.transpose(1, 2))
