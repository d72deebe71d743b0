"""Validation of :func:`attention_with_kvcache` arguments into one canonical, ``(B, S, H, D)``-view form.

Every check that can fail runs here, before the caches are written, so a rejected call leaves them
untouched. Checks of tensor values (sequence lengths, page indices) run on the host for CPU tensors and,
off the CPU, under ``FUSED_ATTENTION_CHECKS=1`` (as the rest of the package does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..argument_checks import (
    check_alibi,
    check_bool,
    check_dense_tensor,
    check_int_vector,
    check_scale,
    check_sinks,
    check_softcap,
    check_window,
    content_checks_enabled,
)
from ..errors import AttentionArgumentError, AttentionTypeError

LAYOUTS = ("bshd", "bhsd")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(slots=True)
class KVCacheCall:
    """Canonical arguments: every 4-D tensor is a ``(B, S, H, D)`` view of the caller's tensor. Not frozen:
    a frozen dataclass sets each of its twenty fields through ``object.__setattr__``, which costs a decode
    step's call microseconds; nothing assigns to it after construction."""

    q: torch.Tensor  # (B, Lq, Hq, D)
    k_cache: torch.Tensor  # (B_cache, S_max, Hkv, D), or paged (num_pages, page_size, Hkv, D)
    v_cache: torch.Tensor  # same with Dv
    k: torch.Tensor | None  # (B, Lnew, Hkv, D)
    v: torch.Tensor | None  # (B, Lnew, Hkv, Dv)
    seqlens: torch.Tensor  # int64 (B,): keys already in each cache
    leftpad: torch.Tensor | None  # int64 (B,)
    batch_idx: torch.Tensor | None  # int64 (B,)
    block_table: torch.Tensor | None  # int64 (B, max_pages)
    rotary: tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin) (S_ro, R / 2), only when appending
    rotary_interleaved: bool
    is_causal: bool
    window: tuple[int, int]
    alibi_slopes: torch.Tensor | None  # (1 or B, Hq) float32
    softcap: float | None
    scale: float
    return_lse: bool
    num_splits: int
    layout: str
    sinks: torch.Tensor | None = None  # (Hq,) float32 sink logits

    @property
    def new_len(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    @property
    def rotary_query_rows_in_order(self) -> bool:
        """Fused RoPE rotates query row i at ``cache_seqlens + i`` when causal or windowed (as
        FlashAttention), else every query row at ``cache_seqlens``."""
        return self.is_causal or self.window != (-1, -1)

    @property
    def capacity(self) -> int:
        """Keys one sequence can hold: ``S_max``, or ``max_pages * page_size``."""
        if self.block_table is None:
            return self.k_cache.shape[1]
        return self.block_table.shape[1] * self.k_cache.shape[1]


def _float4(name: str, t: object, layout: str) -> torch.Tensor:
    check_dense_tensor(name, t)  # sparse: the append failed in the dispatcher, naming no argument
    if t.dtype not in _FLOATS:
        raise AttentionTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != 4:
        raise AttentionArgumentError(f"{name} must be 4-D in layout {layout!r}, got shape {tuple(t.shape)}")
    return t if layout == "bshd" else t.transpose(1, 2)


def _int_per_batch(name: str, t: object, batch: int, device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    if isinstance(t, int) and not isinstance(t, bool):
        _fail_if(not -(2**63) <= t < 2**63, lambda: f"{name} must fit in int64, got {t}")  # (torch.full's OverflowError)
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    # contiguous: the kernels index the vector as element i at offset i (an int64 view such as t[::2] is
    # not copied by .to)
    return check_int_vector(name, t, batch, device).to(torch.int64).contiguous()


def _fail_if(bad: bool, message: str | Callable[[], str]) -> None:
    """Raises with ``message`` (called first when it is a function: a decode step's call is short, and
    formatting every message of every passing check would cost it tens of microseconds)."""
    if bad:
        raise AttentionArgumentError(message() if callable(message) else message)


def _check_grad(tensors: dict[str, object]) -> None:
    if not torch.is_grad_enabled():
        return
    wanting = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if wanting:
        raise AttentionArgumentError(
            f"attention_with_kvcache is forward only (inference), but {', '.join(wanting)} "
            f"{'requires' if len(wanting) == 1 else 'require'} grad; "
            "call it under torch.no_grad() / torch.inference_mode(), or detach the inputs"
        )


def canonicalize_kvcache_call(
    q, k_cache, v_cache, k, v, *, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, rotary_cos,
    rotary_sin, rotary_interleaved, is_causal, window_size, alibi_slopes, softcap, scale, return_lse,
    num_splits, layout, sinks=None,
) -> KVCacheCall:
    if layout not in LAYOUTS:
        raise AttentionArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    q4 = _float4("q", q, layout)
    kc, vc = _float4("k_cache", k_cache, layout), _float4("v_cache", v_cache, layout)
    if (k is None) != (v is None):
        raise AttentionArgumentError("pass both k and v (the keys and values to append), or neither")
    k4 = None if k is None else _float4("k", k, layout)
    v4 = None if v is None else _float4("v", v, layout)
    _check_grad({"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v, "alibi_slopes": alibi_slopes,
                 "sinks": sinks})
    named = {"q": q4, "k_cache": kc, "v_cache": vc, "k": k4, "v": v4}
    for name, t in named.items():
        if t is not None and (t.dtype != q4.dtype or t.device != q4.device):
            raise AttentionTypeError(
                f"{name} must have q's dtype and device ({q4.dtype}, {q4.device}), got {t.dtype}, {t.device}"
            )
    batch, seq_q, heads_q, dim = q4.shape
    _, _, heads_kv, _ = kc.shape
    device = q4.device
    dims = "(num_pages, page_size, Hkv, D)" if block_table is not None else "(B_cache, S_max, Hkv, D)"
    if layout == "bhsd":
        dims = "(num_pages, Hkv, page_size, D)" if block_table is not None else "(B_cache, Hkv, S_max, D)"
    _fail_if(seq_q < 1, lambda: f"q must have at least one query row, got shape {tuple(q.shape)}")
    _fail_if(kc.shape[-1] != dim, lambda: f"k_cache head dim {kc.shape[-1]} must equal q's {dim}")
    _fail_if(
        vc.shape[:3] != kc.shape[:3],
        lambda: f"v_cache must match k_cache {dims} except the last dim, got {tuple(v_cache.shape)} vs {tuple(k_cache.shape)}",
    )
    _fail_if(
        heads_kv < 1 or heads_q % heads_kv != 0,
        lambda: f"q's head count {heads_q} must be a multiple of the caches' {heads_kv} (GQA)",
    )
    if k4 is not None and v4 is not None:
        expect = (batch, k4.shape[1], heads_kv)
        _fail_if(
            tuple(k4.shape) != (*expect, dim) or tuple(v4.shape) != (*expect, vc.shape[-1]),
            lambda: f"k and v must be (B, Lnew, Hkv, D) = {(batch, 'Lnew', heads_kv)} in layout {layout!r} with the "
            f"caches' head dims, got k {tuple(k.shape)} and v {tuple(v.shape)}",
        )
    if block_table is not None:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32:
            raise AttentionTypeError(f"block_table must be an int32 tensor (B, max_pages), got {block_table!r:.80}")
        _fail_if(block_table.device != device, lambda: f"block_table must be on {device}, got {block_table.device}")
        _fail_if(
            block_table.dim() != 2 or block_table.shape[0] != batch,
            lambda: f"block_table must be (B, max_pages) with B = {batch}, got {tuple(block_table.shape)}",
        )
        _fail_if(cache_batch_idx is not None, "cache_batch_idx cannot be combined with block_table (a paged cache "
                 "maps batch entries to pages through block_table)")
    elif cache_batch_idx is None:
        _fail_if(kc.shape[0] != batch, lambda: f"k_cache {dims} must have B_cache = B = {batch} without cache_batch_idx, "
                 f"got {tuple(k_cache.shape)}")
    cache_seqlens = kc.shape[1] * (block_table.shape[1] if block_table is not None else 1) \
        if cache_seqlens is None else cache_seqlens
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise AttentionTypeError(f"cache_seqlens must be an int, an int32 (B,) tensor or None, got {cache_seqlens!r}")
    seqlens = _int_per_batch("cache_seqlens", cache_seqlens, batch, device)
    leftpad = _int_per_batch("cache_leftpad", cache_leftpad, batch, device)
    batch_idx = _int_per_batch("cache_batch_idx", cache_batch_idx, batch, device)
    if isinstance(cache_batch_idx, int):
        raise AttentionTypeError("cache_batch_idx must be an int32 (B,) tensor")
    rotary = None
    if (rotary_cos is None) != (rotary_sin is None):
        raise AttentionArgumentError("pass both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None and k4 is not None:
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2 or t.device != device:
                raise AttentionArgumentError(f"{name} must be a float tensor (S_ro, rotary_dim / 2) on {device}")
        _fail_if(rotary_cos.shape != rotary_sin.shape, "rotary_cos and rotary_sin must have the same shape")
        _fail_if(2 * rotary_cos.shape[1] > dim, lambda: f"rotary_dim = 2 * rotary_cos.shape[1] exceeds the head dim {dim}")
        rotary = (rotary_cos, rotary_sin)
    if not isinstance(rotary_interleaved, bool) or not isinstance(is_causal, bool):
        raise AttentionTypeError("rotary_interleaved and is_causal must be bools")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise AttentionArgumentError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    check_bool("return_lse", return_lse)
    zero = softcap is None or (not isinstance(softcap, bool) and softcap == 0)  # 0: none, as FlashAttention's
    softcap = None if zero else check_softcap(softcap, q4.dtype) or None  # (or one too large to cap anything)
    call = KVCacheCall(
        q=q4, k_cache=kc, v_cache=vc, k=k4, v=v4, seqlens=seqlens, leftpad=leftpad, batch_idx=batch_idx,
        block_table=None if block_table is None else block_table.to(torch.int64), rotary=rotary,
        rotary_interleaved=rotary_interleaved, is_causal=is_causal, window=check_window(window_size),
        alibi_slopes=check_alibi(alibi_slopes, batch, heads_q, device), softcap=softcap,
        scale=check_scale(scale, dim), return_lse=return_lse, num_splits=num_splits, layout=layout,
        sinks=check_sinks(sinks, heads_q, device),
    )
    if content_checks_enabled(seqlens):
        _check_contents(call)
    return call


def _check_contents(call: KVCacheCall) -> None:
    """Value checks (a host sync): lengths within capacity, indices inside the cache."""
    seqlens, new = call.seqlens, call.new_len
    # The same tensor as both caches: the appended values would overwrite the keys (views of one buffer at
    # different offsets, as vLLM's and FlashInfer's (2, ...) caches, are fine).
    _fail_if(
        new > 0 and seqlens.numel() > 0 and call.k_cache.numel() > 0
        and call.k_cache.data_ptr() == call.v_cache.data_ptr(),
        "k_cache and v_cache must not be the same memory when k and v are appended (the values would overwrite "
        "the keys)",
    )
    # One reduction for both bounds (a decode step's calls are short: each tensor op counts).
    low, high = (int(x) for x in torch.aminmax(seqlens)) if seqlens.numel() else (0, 0)
    _fail_if(low < 0, lambda: f"cache_seqlens must be >= 0, got {seqlens.tolist()}")
    _fail_if(
        high + new > call.capacity,
        lambda: f"cache_seqlens + Lnew ({new}) must not exceed the cache capacity {call.capacity}, got cache_seqlens "
        f"{seqlens.tolist()}",
    )
    if call.leftpad is not None:
        _fail_if(
            bool(((call.leftpad < 0) | (call.leftpad > seqlens)).any()),
            lambda: f"cache_leftpad must lie in [0, cache_seqlens[b]], got {call.leftpad.tolist()} with cache_seqlens "
            f"{seqlens.tolist()}",
        )
    if call.batch_idx is not None:
        rows = call.k_cache.shape[0]
        _fail_if(
            bool(((call.batch_idx < 0) | (call.batch_idx >= rows)).any()),
            lambda: f"cache_batch_idx must lie in [0, {rows}) (the caches' batch), got {call.batch_idx.tolist()}",
        )
        _fail_if(
            new > 0 and call.batch_idx.unique().numel() != call.batch_idx.numel(),
            lambda: f"cache_batch_idx must not repeat a row when appending k/v, got {call.batch_idx.tolist()}",
        )
    if call.block_table is not None:
        _check_pages(call, high)
    if call.rotary is not None:
        table = call.rotary[0].shape[0]
        query_span = call.q.shape[1] if call.rotary_query_rows_in_order else 1
        last = high + max(new, query_span) if seqlens.numel() else 0
        _fail_if(
            last > table,
            lambda: f"rotary_cos/rotary_sin have {table} rows but positions up to {last - 1} are rotated "
            "(cache_seqlens + max(Lnew, Lq when causal or windowed, else 1))",
        )


def _check_pages(call: KVCacheCall, high: int) -> None:
    """The block table's entries for the pages in use (tokens below ``cache_seqlens[b] + Lnew``) lie in
    the page pool. One reduction over the columns the longest sequence uses settles the usual call; only
    when it sees a bad entry (which may be padding past a shorter sequence's pages) is each row's own
    range looked at."""
    assert call.block_table is not None
    page_size, pages = call.k_cache.shape[1], call.k_cache.shape[0]
    columns = (high + call.new_len + page_size - 1) // page_size
    if columns == 0 or call.block_table.shape[0] == 0:
        return
    low_entry, high_entry = (int(x) for x in torch.aminmax(call.block_table[:, :columns]))
    if low_entry >= 0 and high_entry < pages:
        return
    used_pages = (call.seqlens + call.new_len + page_size - 1) // page_size
    used = torch.arange(columns, device=used_pages.device) < used_pages.unsqueeze(1)
    entries = call.block_table[:, :columns][used]
    _fail_if(
        bool(((entries < 0) | (entries >= pages)).any()),
        lambda: f"block_table entries of used pages must lie in [0, {pages}) (the page pool), got "
        f"{sorted(set(entries.tolist()))}",
    )


def check_written_once(call: KVCacheCall, index: tuple[torch.Tensor, torch.Tensor]) -> None:
    """No cache slot of a paged append is written twice (``index``: :func:`append.write_index`'s pages and
    offsets): two batch entries whose block tables share the page they append to would overwrite each
    other's keys. Pages that several entries only read (a shared prefix) are fine. (The cpu backend's
    append op checks the same in C++.)"""
    if call.block_table is None or not content_checks_enabled(call.seqlens):
        return
    page_size = call.k_cache.shape[1]
    slots = (index[0] * page_size + index[1]).flatten().sort().values
    twice = slots[1:] == slots[:-1]
    _fail_if(
        bool(twice.any()),
        lambda: "block_table: the pages k and v are appended to must belong to one batch entry each, got pages "
        f"{(slots[1:][twice] // page_size).unique().tolist()} written by more than one",
    )
