"""``attention_with_kvcache``: append to a (paged) KV cache and attend, on any backend.

Every call validates everything (:mod:`.validate`) and picks the backend, then rotates the new keys and
writes them into the caches (:mod:`.append`). Where the ``triton`` backend serves the call, its split-KV
kernel reads the caches in place (:mod:`.split_kv`); where the ``cpu`` backend does, one C++ op appends
and attends, reading the caches in place (:mod:`.cpu_cache`). Elsewhere
(``torch``), the plain path views or gathers each entry's keys (:mod:`.paged`) and calls the regular
:func:`fused_attention.scaled_dot_product_attention`. Explicit key splits (``num_splits > 1``) run one
call per split and merge through their lse (:mod:`fused_attention.merge`); on the ``cpu`` and ``torch``
backends 16-bit splits attend in float32 over gathered keys, so that the merged output is rounded once.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..backends.base import Backend
from ..functional import scaled_dot_product_attention
from ..merge import _merge_aligned, accumulation_dtype, fold_sinks_
from .append import append_, rotate_new, write_index
from .cpu_cache import append_and_attend, cache_attention
from .masks import needs_positions, position_mask
from .paged import gather_keys_values
from .plain_call import plain_kvcache_attention
from .split_kv import attention_backend, split_kv_attention
from .validate import KVCacheCall, canonicalize_kvcache_call, check_written_once


def _split_bounds(seq_k: int, num_splits: int) -> list[tuple[int, int]]:
    """Key ranges of the splits; ``num_splits = 0`` picks 1 (the kernels below already parallelize: the
    ``cpu`` op splits long key ranges itself, the regular attention runs over batch and heads)."""
    splits = max(1, min(num_splits or 1, seq_k))
    chunk = -(-seq_k // splits) if seq_k else 0
    return [(s, min(s + chunk, seq_k)) for s in range(0, seq_k, chunk)] if chunk else [(0, 0)]


def _gathered(call: KVCacheCall, q: torch.Tensor, backend: str | None,
              dtype: torch.dtype | None = None) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Attention over key range ``[start, stop)`` of the gathered keys through the regular attention, in
    ``dtype`` (default q's)."""
    keys, values = gather_keys_values(call)
    total = call.seqlens + call.new_len
    mask = position_mask(call, total, keys.shape[2], accumulation_dtype(q.dtype)) if needs_positions(call) else None
    qh = q.transpose(1, 2)
    dtype = dtype or q.dtype  # (each split's keys converted as it runs: one split's copy at a time)
    if dtype != q.dtype:
        qh = qh.to(dtype)
    common = {
        "scale": call.scale, "enable_gqa": qh.shape[1] != keys.shape[1], "softcap": call.softcap,
        "return_lse": True, "backend": backend,
    }

    def attend(start: int, stop: int, sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Key lengths with the position mask too: positions past them hold whatever the cache does (an
        # uninitialized cache's NaN), which a mask alone hides from the scores but not from P V.
        part = {"key_lengths": (total - start).clamp(0, stop - start)}
        if mask is not None:
            part["attn_mask"] = mask[..., start:stop]
        extra = {"sinks": sinks} if sinks is not None else {}
        return scaled_dot_product_attention(
            qh, keys[:, :, start:stop].to(dtype), values[:, :, start:stop].to(dtype), **part, **common, **extra
        )

    return attend


def _attend(call: KVCacheCall, q: torch.Tensor, chosen: Backend, backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` over the caches (already holding the new keys)."""
    if chosen.name == "triton":
        return split_kv_attention(call, q)
    bounds = _split_bounds(call.capacity, call.num_splits)
    # Several 16-bit splits attend in float32 (over gathered keys): outputs rounded to 16 bits before
    # their merge were rounded twice (up to 1.7x the float32-arithmetic bound at 8 splits, bfloat16).
    wide = len(bounds) > 1 and accumulation_dtype(q.dtype) != q.dtype
    if chosen.name == "cpu" and not wide:
        attend = partial(cache_attention, call, q)
    else:
        attend = _gathered(call, q, backend, accumulation_dtype(q.dtype) if wide else None)
    # One split takes the sinks in the kernel; several take them once, at the merge.
    sinks = call.sinks if len(bounds) == 1 else None
    parts = [attend(start, stop, sinks) for start, stop in bounds]
    if len(parts) == 1:
        return parts[0]
    out, lse = _merge_aligned([o for o, _ in parts], [l for _, l in parts])
    if call.sinks is not None:
        fold_sinks_(out, lse, call.sinks)
    return out.to(q.dtype), lse


def _append_and_attend(call: KVCacheCall, q: torch.Tensor, k: torch.Tensor, chosen: Backend,
                       backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Appends ``k`` (rotated) and ``call.v``, then attends; the caches as they were if anything fails."""
    if chosen.name == "cpu" and call.num_splits <= 1:
        return append_and_attend(call, q, k)  # one op that checks everything before it writes
    index = write_index(call)
    check_written_once(call, index)
    assert call.v is not None
    saved = (call.k_cache[index].clone(), call.v_cache[index].clone())
    append_(call, index, k, call.v)
    try:
        return _attend(call, q, chosen, backend)
    except Exception:
        append_(call, index, *saved)  # leave the caches as they were
        raise


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = False,
    is_causal: bool = False,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    num_splits: int = 0,
    layout: str = "bshd",
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Mutates ``k_cache`` and ``v_cache`` in place (when ``k``, ``v`` are given), then attends over them.

    FlashAttention's ``flash_attn_with_kvcache`` (same argument names and meanings), on every backend:
    when ``k``, ``v`` are given they are written into the caches at positions ``cache_seqlens[b] ..``
    (RoPE applied first when ``rotary_cos``/``rotary_sin`` are given), then ``q`` attends over the
    ``cache_seqlens[b] + Lnew`` keys of each batch entry, all in one call. The caches are the only tensors
    modified; every check runs before they are written, and they are restored if the attention fails (on
    the ``cpu`` backend the append and the attention are one op that writes only once nothing can fail).

    Args:
        q: ``(B, Lq, Hq, D)`` (``layout="bshd"``, FlashAttention's) or ``(B, Hq, Lq, D)`` (``"bhsd"``);
            any ``Lq >= 1`` (speculative decoding verifies several tokens with ``is_causal``).
            float16, bfloat16, float32 or float64.
        k_cache, v_cache: contiguous ``(B_cache, S_max, Hkv, D)`` (``"bshd"``) / ``(B_cache, Hkv, S_max, D)``
            (``"bhsd"``); or paged, with ``block_table``: ``(num_pages, page_size, Hkv, D)`` /
            ``(num_pages, Hkv, page_size, D)``, any ``page_size >= 1``. q's dtype and device; any
            strides. ``v_cache`` may have another head dim ``Dv``. ``Hq`` must be a multiple of ``Hkv``
            (GQA of any group size; K and V are not repeated).
        k, v: optional new keys and values ``(B, Lnew, Hkv, D)`` / ``(B, Lnew, Hkv, Dv)`` (``"bshd"``;
            ``(B, Hkv, Lnew, D)`` for ``"bhsd"``) to append. Not modified.
        cache_seqlens: keys already in each cache: an int, an int32/int64 ``(B,)`` tensor, or None (every
            cache full: ``S_max`` keys, or all of the block table's pages). An append past a cache's
            capacity raises (checked on the host for CPU tensors; off the CPU under
            ``FUSED_ATTENTION_CHECKS=1``).
        cache_batch_idx: int ``(B,)``: the cache row each batch entry uses (default ``b``); rows may not
            repeat when appending. Not with ``block_table``. Selected rows are read in place (copied
            on ``torch``).
        cache_leftpad: int ``(B,)``: the cache of entry ``b`` starts at ``cache_leftpad[b]``; keys before it
            are masked. Must lie in ``[0, cache_seqlens[b]]``. Positions (masks, RoPE, ALiBi) are cache
            indices either way.
        block_table: int32 ``(B, max_pages)``: page ``i`` of entry ``b``'s sequence is
            ``k_cache[block_table[b, i]]``. Only entries of pages in use are read (others may be -1).
        rotary_cos, rotary_sin: ``(S_ro, rotary_dim / 2)`` tables (:func:`fused_attention.rotary_cos_sin`),
            used only when ``k``, ``v`` are given (as in FlashAttention): new key ``i`` is rotated at
            position ``cache_seqlens[b] + i``; query row ``i`` at ``cache_seqlens[b] + i`` when causal or
            windowed, else every query row at ``cache_seqlens[b]``. The first ``rotary_dim`` features
            rotate, the rest pass through.
        rotary_interleaved: pairs ``(2i, 2i + 1)`` (GPT-J) instead of half-split (GPT-NeoX / Llama).
        is_causal: causal mask aligned bottom-right: query row ``i`` of ``Lq`` sits at key position
            ``cache_seqlens[b] + Lnew - Lq + i`` and sees keys up to it.
        window_size: ``(left, right)``: a query at position ``p`` sees keys ``p - left .. p + right``;
            -1 leaves a side unbounded. ``None`` or ``(-1, -1)``: no window.
        alibi_slopes: float32 ``(Hq,)`` or ``(B, Hq)``: adds ``-slope * |p - j|`` to the score of key ``j``.
        softcap: ``score = softcap * tanh(score / softcap)``; ``None`` or 0 disables it (as does one too
            large to cap anything: see :func:`scaled_dot_product_attention`).
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the natural-log log-sum-exp ``(B, Hq, Lq)`` in both layouts, float32
            (float64 for float64 inputs).
        num_splits: split the keys into this many chunks, attend to each, and merge exactly through the
            lse (:func:`fused_attention.merge_attention_states_list`; on the ``cpu`` and ``torch``
            backends float16/bfloat16 splits run in float32 on gathered keys, so the output is rounded
            once); 1 disables splitting, 0 chooses:
            on the ``triton`` backend's split-KV kernel enough splits to fill the GPU (1 on the CPU
            interpreter), on the other backends 1 (the ``cpu`` kernel still spreads a long cache's keys
            over threads in fixed 512-key chunks, merged in order, whatever the thread count). The
            result is deterministic for a given ``num_splits`` on a given device.
        layout: ``"bshd"`` (default, FlashAttention's) or ``"bhsd"`` (torch's and Hugging Face's).
        sinks: learned attention sinks, float32 ``(Hq,)``, as in
            :func:`fused_attention.scaled_dot_product_attention` (the lse then includes the sink; key
            splits are computed without it and the sink joins once, at their merge).
        backend: the attention backend (``"triton"``, ``"cpu"``, ``"torch"``; else automatic), as in
            :func:`fused_attention.scaled_dot_product_attention`, which this calls.

    Forward only: a call that would need a gradient (an input requiring grad with grad mode on) raises.
    A query row that sees no key gives output 0 and lse ``-inf`` (the sink's logit with ``sinks``).

    Returns:
        ``out`` in q's layout, shape and dtype; with ``return_lse=True``, ``(out, lse)``.

    Raises:
        ValueError / TypeError naming the bad argument, the caches untouched.
    """
    out = plain_kvcache_attention(
        q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, is_causal, scale,
        return_lse, layout, num_splits, window_size, softcap, alibi_slopes, sinks, rotary_cos, rotary_sin,
        rotary_interleaved, backend,
    )
    if out is not None:
        return out
    call = canonicalize_kvcache_call(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad, block_table=block_table, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved, is_causal=is_causal, window_size=window_size,
        alibi_slopes=alibi_slopes, softcap=softcap, scale=scale, return_lse=return_lse,
        num_splits=num_splits, layout=layout, sinks=sinks,
    )
    chosen = attention_backend(call, backend)  # raises for a backend that cannot serve: caches untouched
    q_rot, k_rot = rotate_new(call, backend)
    if k_rot is None:
        out, lse = _attend(call, q_rot, chosen, backend)
    else:
        out, lse = _append_and_attend(call, q_rot, k_rot, chosen, backend)
    out = out.transpose(1, 2).contiguous() if layout == "bshd" else out
    return (out, lse) if return_lse else out
