"""The ``cpu`` backend's attention over a KV cache: the C++ ops read the caches where they lie, contiguous
or paged, so nothing is gathered (the plain path copies every page in use).

The ops see every cache as pages: a paged cache through its block table, a contiguous one as one page of
``S_max`` keys per batch entry (its cache row, which is how ``cache_batch_idx`` costs no copy either).
Positions are the cache's: query row ``i`` sits at ``total[b] - Lq + i``, keys before ``cache_leftpad``
are hidden by where the entry's keys begin. The page table, the key ranges and the append are worked out
inside the ops: a decode step's call is short, and every tensor op in Python adds microseconds to it.
"""

from __future__ import annotations

import torch

from .masks import visible_window
from .validate import KVCacheCall


def _common(call: KVCacheCall) -> tuple:
    left, right = visible_window(call)
    return call.alibi_slopes, left, right, call.softcap or 0.0, call.scale


def cache_attention(
    call: KVCacheCall, q: torch.Tensor, start: int, stop: int, sinks: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` of ``q`` ``(B, Lq, Hq, D)`` over the keys at cache
    positions ``[start, stop)`` (a key split; the caches already hold the appended keys)."""
    alibi, left, right, softcap, scale = _common(call)
    return torch.ops.fused_attention.kvcache_attention(
        q.transpose(1, 2), call.k_cache.transpose(1, 2), call.v_cache.transpose(1, 2), call.block_table,
        call.batch_idx, call.seqlens, call.new_len, call.leftpad, start, stop, alibi, sinks, left, right, softcap,
        scale,
    )


def append_and_attend(call: KVCacheCall, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes ``k`` (rotated) and ``call.v`` ``(B, Lnew, Hkv, D)`` into the caches, then attends over all of
    their keys, in one op that checks everything before it writes (so a failed call leaves them as they
    were); ``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))``."""
    alibi, left, right, softcap, scale = _common(call)
    assert call.v is not None
    return torch.ops.fused_attention.kvcache_append_attention_(
        call.k_cache.transpose(1, 2), call.v_cache.transpose(1, 2), k.transpose(1, 2), call.v.transpose(1, 2),
        q.transpose(1, 2), call.block_table, call.batch_idx, call.seqlens, call.leftpad, alibi, call.sinks, left,
        right, softcap, scale,
    )
