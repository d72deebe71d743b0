"""The ``cpu`` backend's attention over a KV cache: the C++ ``kvcache_attention`` op reads the caches where
they lie, contiguous or paged, so nothing is gathered (the plain path copies every page in use).

The op sees every cache as pages: a paged cache through its block table, a contiguous one as one page of
``S_max`` keys per batch entry (its cache row, which is how ``cache_batch_idx`` costs no copy either).
Positions are the cache's: query row ``i`` sits at ``total[b] - Lq + i``, keys before ``cache_leftpad``
are hidden by where the entry's keys begin.
"""

from __future__ import annotations

import torch

from .masks import visible_window
from .paged import page_table
from .validate import KVCacheCall


def cache_attention(
    call: KVCacheCall, q: torch.Tensor, start: int, stop: int, sinks: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` of ``q`` ``(B, Lq, Hq, D)`` over the keys at cache
    positions ``[start, stop)`` (a key split; the caches already hold the appended keys)."""
    k, v = call.k_cache.transpose(1, 2), call.v_cache.transpose(1, 2)  # (pages, Hkv, page_size, D)
    total = call.seqlens + call.new_len
    begin = total.new_full(total.shape, start) if call.leftpad is None else call.leftpad.clamp(min=start)
    left, right = visible_window(call)
    return torch.ops.fused_attention.kvcache_attention(
        q.transpose(1, 2), k, v, page_table(call), total, begin, total.clamp(max=stop), call.alibi_slopes, sinks, left,
        right, call.softcap or 0.0, call.scale,
    )
