"""Keys and values of each batch entry as ``(B, Hkv, S, D)`` tensors, from contiguous or paged caches."""

from __future__ import annotations

import torch

from .validate import KVCacheCall


def page_table(call: KVCacheCall) -> torch.Tensor:
    """Each batch entry's pages, int64 ``(B, pages)`` with unit-stride rows: the block table of a paged
    cache, or for a contiguous one a single page of ``S_max`` keys per entry (its cache row, the
    ``cache_batch_idx`` entry when given), so kernels that read pages read both kinds in place."""
    if call.block_table is not None:
        return call.block_table.contiguous()
    batch = call.q.shape[0]
    rows = call.batch_idx if call.batch_idx is not None else torch.arange(batch, device=call.q.device)
    return rows.reshape(batch, 1).contiguous()


def gather_keys_values(call: KVCacheCall) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, Hkv, S_k, D)`` keys and values: views of a contiguous cache (no copy), a copy of the rows
    ``cache_batch_idx`` selects, or, for a paged cache, its pages concatenated in block-table order.

    Key ``j`` of the result is position ``j`` of the sequence; positions past ``cache_seqlens + Lnew`` are
    whatever the cache holds there (masked by the caller).
    """
    k, v = call.k_cache, call.v_cache
    if call.block_table is not None:
        # Entries past the used pages may hold anything (-1 padding): clamp them, their keys are masked.
        table = call.block_table.clamp(0, k.shape[0] - 1)
        batch, max_pages = table.shape
        k = k[table].reshape(batch, max_pages * k.shape[1], *k.shape[2:])
        v = v[table].reshape(batch, max_pages * v.shape[1], *v.shape[2:])
    elif call.batch_idx is not None:
        k, v = k.index_select(0, call.batch_idx), v.index_select(0, call.batch_idx)
    return k.transpose(1, 2), v.transpose(1, 2)
