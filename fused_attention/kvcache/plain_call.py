"""The common CPU call of :func:`attention_with_kvcache`, straight to the extension's kernel.

A decode step's call spent 40-70 us on the host against 12 us for ``scaled_dot_product_attention``'s
short path (one query row of 32 heads against 16 keys, 2 threads, a Zen 4, 2026-12-07): validating and
canonicalizing twenty arguments in Python, choosing the backend, and the op's schema parsing. When the
call has one key split and the automatic backend, and automatic dispatch would choose the ``cpu`` backends
as built (attention, and RoPE's where tables are given), the window, softcap, ALiBi slopes and sinks are
canonicalized here by the full path's own checks, and the extension's ``kvcache_plain`` checks the rest in
C++ (shapes, lengths within capacity, left padding within the lengths, cache rows and pages in use inside
the caches, no slot appended twice, the tables' rows: ``csrc/cpu/kvcache_plain.h``) and makes the full
path's op calls (the same bits; an append bumps the caches' version counters as the op does).
Anything else, and every call the full path would reject, takes the full path, which raises its errors.
"""

from __future__ import annotations

import torch

from ..argument_checks import check_alibi, check_sinks, check_softcap, check_window
from ..backends.cpu_backend import _OPS
from ..backends.plain_call import short_path_open
from ..backends.positional import POSITION_BACKENDS, ExtensionPositions, select_position_backend

_PLAIN = None
if _OPS is not None:
    from .. import _C  # loaded: _OPS exists only then

    _PLAIN = getattr(_C, "kvcache_plain", None)  # (an extension built before it has none)


# The cpu position backend as imported, and its state and kernels' methods then: the short entry calls those
# kernels, so the full path must be about to (the choice itself is select_position_backend's, as the full
# path's).
_CPU_POSITIONS = POSITION_BACKENDS.get("cpu")
_CPU_POSITIONS_STATE = dict(vars(_CPU_POSITIONS)) if type(_CPU_POSITIONS) is ExtensionPositions else None
_ROTARY_AS_BUILT = (ExtensionPositions.rotary, ExtensionPositions.rotary_qk)


def _cpu_rope_as_built(q: object) -> bool:
    """Whether the full path would rotate new keys (and queries) with the cpu position backend as built."""
    return (
        _CPU_POSITIONS_STATE is not None
        and type(q) is torch.Tensor
        and q.is_floating_point()  # (else no position backend serves it: the full path's error)
        and select_position_backend(q) is _CPU_POSITIONS
        and vars(_CPU_POSITIONS) == _CPU_POSITIONS_STATE
        and (ExtensionPositions.rotary, ExtensionPositions.rotary_qk) == _ROTARY_AS_BUILT
    )


_NO_FEATURES = (-1, -1, 0.0, None, None)


def _features(q: object, layout: str, window_size: object, softcap: object, alibi_slopes: object,
              sinks: object) -> tuple | None:
    """``(window_left, window_right, softcap, alibi (1 or B, Hq), sinks)`` as the full path canonicalizes them
    (``check_window``, ``check_softcap``, ``check_alibi``, ``check_sinks``), or None where any would raise: the
    full path then raises the error of whatever it checks first."""
    if window_size is None and softcap is None and alibi_slopes is None and sinks is None:
        return _NO_FEATURES
    if type(q) is not torch.Tensor or q.dim() != 4:
        return None
    batch, heads = q.shape[0], q.shape[2 if layout == "bshd" else 1]
    try:
        left, right = check_window(window_size)
        zero = softcap is None or (not isinstance(softcap, bool) and softcap == 0)  # (as canonicalize_kvcache_call)
        cap = 0.0 if zero else check_softcap(softcap, q.dtype)
        alibi = check_alibi(alibi_slopes, batch, heads, q.device)
        sink_logits = check_sinks(sinks, heads, q.device)
    except (TypeError, ValueError):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (alibi, sink_logits)):
        return None  # (forward only: the full path raises)
    return left, right, cap, alibi, sink_logits


def plain_kvcache_attention(
    q: object, k_cache: object, v_cache: object, k: object, v: object, cache_seqlens: object, cache_batch_idx: object,
    cache_leftpad: object, block_table: object, is_causal: object, scale: object, return_lse: object, layout: object,
    num_splits: object, window_size: object, softcap: object, alibi_slopes: object, sinks: object, rotary_cos: object,
    rotary_sin: object, rotary_interleaved: object, backend: object,
) -> object:
    """``out`` (``(out, lse)`` with ``return_lse``) of the call, or None when it must take the full path."""
    if (
        _PLAIN is None
        or backend is not None
        or type(layout) is not str
        or layout not in ("bshd", "bhsd")
        or type(num_splits) is not int
        or not 0 <= num_splits <= 1  # (one key split, chosen or asked for)
        or type(rotary_interleaved) is not bool
        or not short_path_open()
        or (k is not None and rotary_cos is not None and not _cpu_rope_as_built(q))
    ):
        return None
    features = _features(q, layout, window_size, softcap, alibi_slopes, sinks)
    if features is None:
        return None
    return _PLAIN(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, is_causal,
                  scale, return_lse, rotary_cos, rotary_sin, rotary_interleaved, *features, layout == "bhsd")
