"""KV caches that own their storage: :class:`PagedKVCache` (a page pool with block tables) and
:class:`StaticKVCache` (one contiguous row per sequence). Both call :func:`attention_with_kvcache`."""

from __future__ import annotations

from typing import Any

import torch

from ..argument_checks import check_at_least, int_value
from ..errors import AttentionArgumentError, AttentionTypeError
from .attention import attention_with_kvcache
from .validate import LAYOUTS


def _count(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int of at least ``minimum`` (integer scalars, as :func:`int_value` takes them)."""
    number = int_value(value)
    if number is None:
        raise AttentionTypeError(f"{name} must be an int, got {value!r:.60}")
    number = int(number)  # page bookkeeping is host-side lists and sets: a traced SymInt specializes here
    check_at_least(name, number, minimum, f">= {minimum}", number)
    return number


def _check_storage(dtype: Any, **sizes: Any) -> None:
    """The sizes a cache is built with (each >= 1; None: not given) and its floating-point dtype."""
    for name, size in sizes.items():
        if size is not None:
            _count(name, size, 1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise AttentionTypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


def _slots(batch_idx: Any, max_batch: int) -> list[int]:
    if batch_idx is None:
        return list(range(max_batch))
    if isinstance(batch_idx, torch.Tensor):
        if batch_idx.dtype == torch.bool or batch_idx.is_floating_point() or batch_idx.is_complex():
            raise AttentionTypeError(f"batch_idx must hold integers, got a {batch_idx.dtype} tensor")
        if batch_idx.dim() > 1:
            raise AttentionArgumentError(f"batch_idx must be 1-D, got shape {tuple(batch_idx.shape)}")
        batch_idx = batch_idx.reshape(-1).tolist()
    try:
        items = list(batch_idx)
    except TypeError:  # (an int: "'int' object is not iterable", naming nothing)
        raise AttentionTypeError(
            f"batch_idx must be a list or 1-D tensor of sequence slots, got {batch_idx!r:.60}"
        ) from None
    slots = [_count("batch_idx", b, 0) for b in items]
    if any(b >= max_batch for b in slots) or len(set(slots)) != len(slots):
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
        _check_storage(dtype, num_pages=num_pages, page_size=page_size, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, max_batch=max_batch, max_pages_per_seq=max_pages_per_seq,
                       head_dim_v=head_dim_v)
        if layout not in LAYOUTS:
            raise AttentionArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.page_size, self.layout = page_size, layout
        inner = (page_size, num_kv_heads) if layout == "bshd" else (num_kv_heads, page_size)
        self.k_pages = torch.zeros(num_pages, *inner, head_dim, dtype=dtype, device=device)
        self.v_pages = torch.zeros(num_pages, *inner, head_dim_v or head_dim, dtype=dtype, device=device)
        max_pages = num_pages if max_pages_per_seq is None else max_pages_per_seq
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
        num_tokens = _count("num_tokens", num_tokens, 0)
        self._reserve({slot: int(self.seqlens[slot]) + num_tokens}, num_tokens)

    def _reserve(self, lengths: dict[int, int], num_tokens: int) -> dict[int, int]:
        """Pages for each sequence ``slot`` of ``lengths`` to hold ``lengths[slot]`` tokens (``num_tokens``
        of them new), all or none: raises, taking nothing, when the pool or a row is too small. Returns
        each slot's page count before (for :meth:`_release`)."""
        needs = {slot: -(-length // self.page_size) - len(self._pages[slot]) for slot, length in lengths.items()}
        needs = {slot: need for slot, need in needs.items() if need > 0}
        for slot, need in needs.items():
            if len(self._pages[slot]) + need > self.block_table.shape[1]:
                raise AttentionArgumentError(
                    f"cannot reserve {num_tokens} tokens for sequence {slot}: {need} more pages needed, "
                    f"{self.block_table.shape[1] - len(self._pages[slot])} left in its block-table row"
                )
        if sum(needs.values()) > len(self._free):
            raise AttentionArgumentError(
                f"cannot reserve {num_tokens} tokens for sequences {list(needs)}: {sum(needs.values())} more "
                f"pages needed, {len(self._free)} free"
            )
        before = {slot: len(self._pages[slot]) for slot in needs}
        for slot, need in needs.items():
            new = [self._free.pop() for _ in range(need)]
            first = len(self._pages[slot])
            self._pages[slot].extend(new)
            self.block_table[slot, first : first + need] = torch.tensor(new, dtype=torch.int32)
        return before

    def _release(self, before: dict[int, int]) -> None:
        """Gives back the pages :meth:`_reserve` took (``before``: its return), as if it had not run."""
        for slot, count in reversed(before.items()):
            self._free.extend(reversed(self._pages[slot][count:]))
            del self._pages[slot][count:]
            self.block_table[slot, count:] = 0

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
        _check_batch(q, slots)
        new = _new_tokens(k, self.layout)
        taken: dict[int, int] = {}
        if new:
            lengths = self.seqlens.tolist()  # one host sync for every slot
            taken = self._reserve({slot: lengths[slot] + new for slot in slots}, new)
        try:
            if batch_idx is None:  # every slot: the tables themselves, no gathered copies
                seqlens, table, index = self.seqlens, self.block_table, None
            else:
                index = torch.tensor(slots, dtype=torch.int64, device=self.seqlens.device)
                seqlens, table = self.seqlens[index], self.block_table[index]
            result = attention_with_kvcache(
                q, self.k_pages, self.v_pages, k, v, cache_seqlens=seqlens, block_table=table,
                layout=self.layout, **kwargs,
            )
        except BaseException:  # the call checks before it writes: the cache stays as it was, pages too
            self._release(taken)
            raise
        _advance(self.seqlens, index, new)
        return result


def _check_batch(q: Any, slots: list[int]) -> None:
    """q has a sequence for each slot (else attention_with_kvcache would blame a table the user never passed)."""
    if isinstance(q, torch.Tensor) and q.dim() >= 1 and q.shape[0] != len(slots):
        raise AttentionArgumentError(
            f"q must have one sequence per slot of batch_idx ({len(slots)}), got batch size {q.shape[0]}"
        )


def _new_tokens(k: Any, layout: str) -> int:
    """The tokens ``k`` appends; 0 when it is not a 4-D tensor (attention_with_kvcache then names it)."""
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        return 0
    return k.shape[1 if layout == "bshd" else 2]


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
        _check_storage(dtype, max_batch=max_batch, max_seqlen=max_seqlen, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, head_dim_v=head_dim_v)
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
        _check_batch(q, slots)
        new = _new_tokens(k, self.layout)
        if batch_idx is None:  # every row, in order: no index, no gathered lengths
            seqlens, rows, index = self.seqlens, None, None
        else:
            index = torch.tensor(slots, dtype=torch.int64, device=self.seqlens.device)
            seqlens, rows = self.seqlens[index], index.to(torch.int32)
        result = attention_with_kvcache(
            q, self.k, self.v, k, v, cache_seqlens=seqlens, cache_batch_idx=rows, layout=self.layout, **kwargs,
        )
        _advance(self.seqlens, index, new)
        return result
