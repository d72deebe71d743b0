"""KV caches that own their storage: :class:`PagedKVCache` (a page pool with block tables) and
:class:`StaticKVCache` (one contiguous row per sequence). Both call :func:`attention_with_kvcache`."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import AttentionArgumentError
from .attention import attention_with_kvcache
from .validate import LAYOUTS


def _slots(batch_idx: Any, max_batch: int) -> list[int]:
    if batch_idx is None:
        return list(range(max_batch))
    slots = [int(b) for b in (batch_idx.tolist() if isinstance(batch_idx, torch.Tensor) else batch_idx)]
    if any(not 0 <= b < max_batch for b in slots) or len(set(slots)) != len(slots):
        raise AttentionArgumentError(f"batch_idx must be distinct sequence slots in [0, {max_batch}), got {slots}")
    return slots


class PagedKVCache:
    """A paged KV cache: a pool of ``num_pages`` pages of ``page_size`` tokens shared by up to
    ``max_batch`` sequences, each with a row of the int32 ``block_table`` ``(max_batch, max_pages_per_seq)``
    and its length in the int32 ``seqlens`` ``(max_batch,)``.

    Pages are taken from the pool as sequences grow (:meth:`reserve`, done by :meth:`append`) and given
    back by :meth:`free`. ``k_pages``/``v_pages`` are ``(num_pages, page_size, Hkv, D)`` for
    ``layout="bshd"`` and ``(num_pages, Hkv, page_size, D)`` for ``"bhsd"``.
    """

    def __init__(
        self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *, max_batch: int,
        max_pages_per_seq: int | None = None, head_dim_v: int | None = None, layout: str = "bshd",
        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    ) -> None:
        if min(num_pages, page_size, num_kv_heads, head_dim, max_batch) < 1:
            raise AttentionArgumentError("num_pages, page_size, num_kv_heads, head_dim and max_batch must be >= 1")
        if layout not in LAYOUTS:
            raise AttentionArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.page_size, self.layout = page_size, layout
        inner = (page_size, num_kv_heads) if layout == "bshd" else (num_kv_heads, page_size)
        self.k_pages = torch.zeros(num_pages, *inner, head_dim, dtype=dtype, device=device)
        self.v_pages = torch.zeros(num_pages, *inner, head_dim_v or head_dim, dtype=dtype, device=device)
        max_pages = max_pages_per_seq or num_pages
        self.block_table = torch.zeros(max_batch, max_pages, dtype=torch.int32, device=device)
        self.seqlens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self._free = list(range(num_pages - 1, -1, -1))
        self._pages: list[list[int]] = [[] for _ in range(max_batch)]
        self._reserved = [0] * max_batch

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def reserve(self, batch_idx: int, num_tokens: int) -> None:
        """Makes room for ``num_tokens`` more tokens of sequence ``batch_idx`` (takes pages from the pool).
        Raises, taking nothing, when the pool or the sequence's block-table row is too small."""
        slot = _slots([batch_idx], len(self._pages))[0]
        self._reserve(slot, int(self.seqlens[slot]) + num_tokens, num_tokens)

    def _reserve(self, slot: int, length: int, num_tokens: int) -> None:
        """Pages for sequence ``slot`` to hold ``length`` tokens (``num_tokens`` of them new)."""
        need = -(-length // self.page_size) - len(self._pages[slot])
        if need <= 0:
            return
        if need > len(self._free) or len(self._pages[slot]) + need > self.block_table.shape[1]:
            raise AttentionArgumentError(
                f"cannot reserve {num_tokens} tokens for sequence {slot}: {need} more pages needed, "
                f"{len(self._free)} free, {self.block_table.shape[1] - len(self._pages[slot])} left in its row"
            )
        new = [self._free.pop() for _ in range(need)]
        first = len(self._pages[slot])
        self._pages[slot].extend(new)
        self.block_table[slot, first : first + need] = torch.tensor(new, dtype=torch.int32)

    def free(self, batch_idx: int) -> None:
        """Ends sequence ``batch_idx``: its pages go back to the pool and its length to 0."""
        slot = _slots([batch_idx], len(self._pages))[0]
        self._free.extend(reversed(self._pages[slot]))
        self._pages[slot] = []
        self.block_table[slot].zero_()
        self.seqlens[slot] = 0

    def append(
        self, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
        batch_idx: Any = None, **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Appends ``k``, ``v`` (``(B, Lnew, Hkv, D)`` in the cache's layout) to the sequences ``batch_idx``
        (slots, default all ``max_batch``), and returns :func:`attention_with_kvcache` of ``q`` over them.
        ``kwargs`` go to :func:`attention_with_kvcache` (``is_causal``, ``rotary_cos``, ``return_lse``...)."""
        slots = _slots(batch_idx, len(self._pages))
        new = 0 if k is None else k.shape[1 if self.layout == "bshd" else 2]
        if new:
            lengths = self.seqlens.tolist()  # one host sync for every slot
            for slot in slots:
                self._reserve(slot, lengths[slot] + new, new)
        if batch_idx is None:  # every slot: the tables themselves, no gathered copies
            seqlens, table, index = self.seqlens, self.block_table, None
        else:
            index = torch.tensor(slots, device=self.seqlens.device)
            seqlens, table = self.seqlens[index], self.block_table[index]
        result = attention_with_kvcache(
            q, self.k_pages, self.v_pages, k, v, cache_seqlens=seqlens, block_table=table, layout=self.layout,
            **kwargs,
        )
        _advance(self.seqlens, index, new)
        return result


def _advance(seqlens: torch.Tensor, index: torch.Tensor | None, new: int) -> None:
    """Adds ``new`` to the lengths of the sequences at ``index`` (all when None), after their call."""
    if not new:
        return
    if index is None:
        seqlens.add_(new)
    else:
        seqlens[index] += new


class StaticKVCache:
    """A contiguous KV cache: ``k``/``v`` ``(max_batch, max_seqlen, Hkv, D)`` (``"bshd"``) or
    ``(max_batch, Hkv, max_seqlen, D)`` (``"bhsd"``) with int32 ``seqlens`` ``(max_batch,)``."""

    def __init__(
        self, max_batch: int, max_seqlen: int, num_kv_heads: int, head_dim: int, *, head_dim_v: int | None = None,
        layout: str = "bshd", dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise AttentionArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        inner = (max_seqlen, num_kv_heads) if layout == "bshd" else (num_kv_heads, max_seqlen)
        self.k = torch.zeros(max_batch, *inner, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(max_batch, *inner, head_dim_v or head_dim, dtype=dtype, device=device)
        self.seqlens = torch.zeros(max_batch, dtype=torch.int32, device=device)

    def free(self, batch_idx: int) -> None:
        """Ends sequence ``batch_idx`` (its length goes to 0)."""
        self.seqlens[_slots([batch_idx], self.k.shape[0])[0]] = 0

    def append(
        self, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
        batch_idx: Any = None, **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`PagedKVCache.append`, through ``cache_batch_idx``."""
        slots = _slots(batch_idx, self.k.shape[0])
        new = 0 if k is None else k.shape[1 if self.layout == "bshd" else 2]
        if batch_idx is None:  # every row, in order: no index, no gathered lengths
            seqlens, rows, index = self.seqlens, None, None
        else:
            index = torch.tensor(slots, device=self.seqlens.device)
            seqlens, rows = self.seqlens[index], index.to(torch.int32)
        result = attention_with_kvcache(
            q, self.k, self.v, k, v, cache_seqlens=seqlens, cache_batch_idx=rows, layout=self.layout, **kwargs,
        )
        _advance(self.seqlens, index, new)
        return result
