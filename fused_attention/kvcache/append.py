"""The in-place append of new keys and values (with RoPE) into contiguous or paged caches."""

from __future__ import annotations

import torch

from ..backends.positional import select_position_backend
from ..ops.kvcache_append import kvcache_append_
from ..position import kernel_tables
from .validate import KVCacheCall


def rotate_new(call: KVCacheCall, backend: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(q, k)`` with RoPE applied as FlashAttention does it (new tensors; the arguments are kept).

    New key ``i`` of batch entry ``b`` sits at position ``cache_seqlens[b] + i``; so does query row ``i``
    when the mask depends on positions (causal or windowed), else every query row sits at
    ``cache_seqlens[b]``. The tables and positions were checked with the call, so the position kernels
    are called directly (one launch for both when the positions agree, as in a decode step).
    """
    if call.rotary is None or call.k is None:
        return call.q, call.k
    q, k = call.q, call.k
    cos, sin = kernel_tables(*call.rotary, q.dtype)
    kernels = select_position_backend(q, backend)
    start = call.seqlens.unsqueeze(1)
    k_positions = start if k.shape[1] == 1 else start + torch.arange(k.shape[1], device=start.device)
    if q.shape[1] == k.shape[1] and (q.shape[1] == 1 or call.rotary_query_rows_in_order):
        return kernels.rotary_qk(q, k, cos, sin, k_positions, call.rotary_interleaved, False)
    if call.rotary_query_rows_in_order:
        q_positions = start + torch.arange(q.shape[1], device=start.device)
    else:
        q_positions = start.expand(-1, q.shape[1])
    return (
        kernels.rotary(q, cos, sin, q_positions, call.rotary_interleaved, False),
        kernels.rotary(k, cos, sin, k_positions, call.rotary_interleaved, False),
    )


def write_index(call: KVCacheCall) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, second)`` index of every new token into the ``(B_or_pages, S_or_page, H, D)`` cache view."""
    positions = call.seqlens.unsqueeze(1) + torch.arange(call.new_len, device=call.seqlens.device)
    if call.block_table is not None:
        page_size = call.k_cache.shape[1]
        pages = torch.gather(call.block_table, 1, positions // page_size)
        return pages, positions % page_size
    rows = call.batch_idx if call.batch_idx is not None else torch.arange(positions.shape[0], device=positions.device)
    return rows.unsqueeze(1).expand_as(positions), positions


def append_(call: KVCacheCall, index: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> None:
    """Writes ``k``, ``v`` ``(B, Lnew, Hkv, D)`` into the caches at ``index`` (the caches' storage), through
    the custom op that declares the caches as what it mutates."""
    kvcache_append_(call.k_cache, call.v_cache, k, v, *index)
