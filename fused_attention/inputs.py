"""Validation and canonicalization of attention arguments.

Every public attention call is turned, once, into an :class:`AttentionInputs` (or :class:`VarlenInputs`)
object. Backends receive only that object; none re-parses user arguments.

Canonical dense form (all views, nothing is copied unless a stride pattern cannot be expressed):

- ``query`` ``(B, Hq, L, E)``, ``key`` ``(B, Hkv, S, E)``, ``value`` ``(B, Hkv, S, Ev)``; every batch
  dimension of the user's tensors is broadcast and flattened into ``B``; ``Hq % Hkv == 0`` and query head
  ``h`` reads key/value head ``h // (Hq // Hkv)``.
- ``attn_mask`` is 4-D and broadcastable, each dimension either full or 1 (never expanded), so a
  kernel reads it through its strides and its gradient keeps the user's broadcast shape.
- Visibility is ``causal`` (torch's top-left rule, key ``j <= i``) ANDed with a bottom-right aligned
  window ``window_left <= i + S - L - j``, ``j - (i + S - L) <= window_right`` (-1: unbounded), ANDed
  with ``key_lengths`` and the mask. ``causal_lower_right`` is folded into ``window_right = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .argument_checks import (
    check_alibi,
    check_bool,
    check_dropout,
    check_key_lengths,
    check_qkv_types,
    check_scale,
    check_sinks,
    check_softcap,
    check_window,
)
from .errors import AttentionArgumentError, AttentionTypeError

_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class _QueryFacts:
    """Properties every canonical inputs object derives from its query and value."""

    query: torch.Tensor
    value: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def head_dim(self) -> int:
        return self.query.shape[-1]

    @property
    def value_head_dim(self) -> int:
        return self.value.shape[-1]


# Not frozen: a frozen dataclass's __init__ (object.__setattr__ per field) costs ~1.5 us per call, a fifth
# of the whole Python path of a small call. Nothing writes to these objects after canonicalization.
@dataclass(eq=False)
class AttentionInputs(_QueryFacts):
    """Canonical dense attention call (see module docstring for the layout)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    causal: bool
    window_left: int
    window_right: int
    alibi_slopes: torch.Tensor | None
    softcap: float
    key_lengths: torch.Tensor | None
    dropout_p: float
    scale: float
    return_lse: bool
    out_shape: tuple[int, ...]
    lse_shape: tuple[int, ...]
    features: frozenset[str] = field(default_factory=frozenset)
    sinks: torch.Tensor | None = None  # (Hq,) float32/64 sink logits (see check_sinks)


@dataclass(eq=False)
class VarlenInputs(_QueryFacts):
    """Canonical packed (varlen) attention call: ``(total, H, D)`` tensors and ``cu_seqlens``."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal_lower_right: bool
    window_left: int
    window_right: int
    alibi_slopes: torch.Tensor | None
    softcap: float
    dropout_p: float
    scale: float
    return_lse: bool
    features: frozenset[str] = field(default_factory=frozenset)
    sinks: torch.Tensor | None = None  # (Hq,) float32/64 sink logits (see check_sinks)


def _causal_bias_parts(attn_mask: object) -> tuple[str, int, int] | None:
    """(variant, seq_len_q, seq_len_kv) of a torch CausalBias, without importing it when absent."""
    if attn_mask is None or type(attn_mask) is torch.Tensor:  # the common cases: no import, no isinstance
        return None
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # pragma: no cover - torch < 2.3
        return None
    if not isinstance(attn_mask, CausalBias):
        return None
    variant = "upper_left" if attn_mask.variant == CausalVariant.UPPER_LEFT else "lower_right"
    return variant, attn_mask.seq_len_q, attn_mask.seq_len_kv


def _broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The broadcast of ``shapes`` (aligned from the right, as torch does), or None if they do not
    broadcast. Plain integer comparisons: ``torch.broadcast_shapes`` costs ~10 us per call."""
    ndim = max(len(s) for s in shapes)
    out = [1] * ndim
    for shape in shapes:
        for i, d in enumerate(shape, ndim - len(shape)):
            if d != 1:
                if out[i] != 1 and out[i] != d:
                    return None
                out[i] = d
    return tuple(out)


def _flatten_batch(t: torch.Tensor, batch_shape: tuple[int, ...]) -> torch.Tensor:
    """Broadcast the leading dims of a 4+-D ``t`` to ``batch_shape`` and flatten them into one.

    All-1 leading dims stay one broadcast dim; otherwise the result is a view when strides allow, and a
    copy for a mixed broadcast over several batch dims (that cannot be one strided dim). A 4-D ``t``
    whose batch is already ``batch_shape`` or 1 is returned as it is.
    """
    if t.dim() == 4 and len(batch_shape) == 1:
        return t if t.shape[0] == batch_shape[0] or t.shape[0] == 1 else t.expand(*batch_shape, *t.shape[1:])
    tail = tuple(t.shape[-3:])
    if all(d == 1 for d in t.shape[:-3]):
        return t.reshape(1, *tail)
    return t.expand(*batch_shape, *tail).reshape(math.prod(batch_shape), *tail)


def _batch_view(t: torch.Tensor, batch_shape: tuple[int, ...], batch: int) -> torch.Tensor:
    """``t`` ``(..., H, N, D)`` with its batch dims broadcast to ``batch_shape`` and flattened into one
    of size ``batch`` (a view when strides allow); a 4-D ``t`` of that batch is returned as it is."""
    if t.dim() == 4 and t.shape[0] == batch:
        return t
    return t.expand(*batch_shape, *t.shape[-3:]).reshape(batch, *t.shape[-3:])


def _canonical_mask(
    attn_mask: torch.Tensor, query: torch.Tensor, attn_shape: tuple[int, ...], batch_shape: tuple[int, ...]
) -> torch.Tensor:
    """A 4-D mask, broadcastable to ``(B, H, L, S)``, from one broadcastable to ``attn_shape``."""
    if attn_mask.is_nested:
        raise AttentionTypeError("attn_mask: nested tensors are not supported")
    if attn_mask.layout != torch.strided:
        raise AttentionTypeError(f"attn_mask must be a dense tensor, got layout {attn_mask.layout}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != torch.float32 and attn_mask.dtype != query.dtype:
        raise AttentionTypeError(
            f"attn_mask must be bool, float32 or the query dtype ({query.dtype}), got {attn_mask.dtype}"
        )
    if attn_mask.device != query.device:
        raise AttentionArgumentError(f"attn_mask must be on {query.device}, got {attn_mask.device}")
    shape = attn_mask.shape
    extra = len(attn_shape) - len(shape)
    # Broadcastable to attn_shape without growing it: every dim is 1 or the attention's size.
    if extra < 0 or any(d != 1 and d != attn_shape[extra + i] for i, d in enumerate(shape)):
        raise AttentionArgumentError(
            f"attn_mask of shape {tuple(shape)} does not broadcast to the attention shape {attn_shape}"
        )
    mask = attn_mask if extra == 0 else attn_mask.reshape((1,) * extra + tuple(shape))
    if len(attn_shape) == 3:  # (N, L, S): no heads dimension
        mask = mask.unsqueeze(1)
    return _flatten_batch(mask, batch_shape)


def _features(
    causal: bool, window: bool, alibi: bool, softcap: bool, key_lengths: bool, mask: torch.Tensor | None,
    dropout: bool, gqa: bool, lse: bool, value_head_dim: bool, sinks: bool,
) -> frozenset[str]:
    """The feature names backends declare (``backends.base.ALL_FEATURES``) that this call uses."""
    on = []
    if causal:
        on.append("causal")
    if window:
        on.append("window")
    if alibi:
        on.append("alibi")
    if softcap:
        on.append("softcap")
    if key_lengths:
        on.append("key_lengths")
    if mask is not None:
        on.append("bool_mask" if mask.dtype == torch.bool else "float_mask")
        if mask.requires_grad:
            on.append("mask_grad")
    if dropout:
        on.append("dropout")
    if gqa:
        on.append("gqa")
    if lse:
        on.append("lse")
    if value_head_dim:
        on.append("value_head_dim")
    if sinks:
        on.append("sinks")
    return frozenset(on) if on else _NO_FEATURES


_NO_FEATURES: frozenset[str] = frozenset()


def _canonical_qkv(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...], int, bool]:
    """``(q, k, v, batch_shape, heads, headless)``: the canonical 4-D views, the user's broadcast batch
    dims, the number of query heads, and whether the user's tensors had no heads dim (3-D, no GQA)."""
    qs, ks, vs = query.shape, key.shape, value.shape
    if len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and qs[0] == ks[0] == vs[0]:
        # The common call, already canonical: one batch dim, equal or grouped heads.
        hq, hk, hv = qs[1], ks[1], vs[1]
        if hq == hk == hv or (enable_gqa and hk == hv and hk > 0 and hq % hk == 0):
            return query, key, value, (qs[0],), hq, False
    qdim, kdim, vdim = len(qs), len(ks), len(vs)
    # Torch aligns ranks from the right (matmul broadcasting); so do we.
    ndim = max(qdim, kdim, vdim, 3)
    q, k, v = query, key, value
    if not qdim == kdim == vdim == ndim:
        q, k, v = (t if t.dim() == ndim else t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape)) for t in (q, k, v))
    seq_q, seq_k, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    gqa_on_dim0 = False
    if ndim == 3:
        # (N, L, E): no heads dimension, so N is the batch and there is one head -- except that torch's
        # enable_gqa groups dim -3, so under GQA N acts as the heads of a batch of one.
        gqa_on_dim0 = enable_gqa and not (q.shape[0] == k.shape[0] == v.shape[0])
        q, k, v = (t.unsqueeze(0 if gqa_on_dim0 else 1) for t in (q, k, v))
    hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
    q_batch, k_batch, v_batch = tuple(q.shape[:-3]), tuple(k.shape[:-3]), tuple(v.shape[:-3])
    batch_shape = q_batch if q_batch == k_batch == v_batch else _broadcast_shape(q_batch, k_batch, v_batch)
    if batch_shape is None:
        raise AttentionArgumentError(
            f"batch dimensions of query {tuple(query.shape)}, key {tuple(key.shape)} and value "
            f"{tuple(value.shape)} do not broadcast"
        )
    if hq == hk == hv:
        heads = hq
    elif enable_gqa:
        if hk == 0 or hv == 0 or hq % hk or hq % hv:
            raise AttentionArgumentError(
                f"with enable_gqa the number of key ({hk}) and value ({hv}) heads must divide the "
                f"number of query heads ({hq})"
            )
        heads = hq
        if hk != hv:
            # Different key and value head counts cannot share one group size: give value the key's
            # head count (a repeat_interleave, copied: it is no strided view).
            if hk % hv:
                v = v.repeat_interleave(hq // hv, dim=-3)
                k = k.repeat_interleave(hq // hk, dim=-3)
            else:
                v = v.repeat_interleave(hk // hv, dim=-3)
    else:
        broadcast_heads = _broadcast_shape((hq,), (hk,), (hv,))
        if broadcast_heads is None:
            raise AttentionArgumentError(
                f"heads of query ({hq}), key ({hk}) and value ({hv}) must match or broadcast "
                "(pass enable_gqa=True for grouped-query attention)"
            )
        heads = broadcast_heads[0]
        q = q.expand(*q.shape[:-3], heads, seq_q, head_dim)
        k = k.expand(*k.shape[:-3], heads, seq_k, head_dim)
        v = v.expand(*v.shape[:-3], heads, seq_k, v.shape[-1])

    batch = math.prod(batch_shape)
    qc, kc, vc = _batch_view(q, batch_shape, batch), _batch_view(k, batch_shape, batch), _batch_view(v, batch_shape, batch)
    return qc, kc, vc, batch_shape, heads, ndim == 3 and not gqa_on_dim0


def _check_ranks_and_flags(
    query: object, key: object, value: object, is_causal: object, enable_gqa: object, return_lse: object
) -> None:
    """Types, ranks, the head dims q/k and lengths k/v that must agree, and the bool flags."""
    check_qkv_types(query, key, value)
    assert isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)
    qs, ks, vs = query.shape, key.shape, value.shape
    if len(qs) < 2 or len(ks) < 2 or len(vs) < 2:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() < 2:
                raise AttentionArgumentError(
                    f"{name} must have at least 2 dimensions (..., seq, dim), got {t.dim()}"
                )
    if qs[-1] != ks[-1]:
        raise AttentionArgumentError(f"key head dim {ks[-1]} must equal query head dim {qs[-1]}")
    if ks[-2] != vs[-2]:
        raise AttentionArgumentError(
            f"value sequence length {vs[-2]} must equal key sequence length {ks[-2]}"
        )
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa), ("return_lse", return_lse)):
        check_bool(name, flag)


def _visibility(
    attn_mask: object,
    is_causal: bool,
    window_size: object,
    query: torch.Tensor,
    scores_shape: tuple[int, ...],
    batch_shape: tuple[int, ...],
) -> tuple[bool, tuple[int, int], torch.Tensor | None]:
    """``is_causal``, the window and ``attn_mask`` as (causal, (left, right), canonical mask): a
    ``CausalBias`` becomes ``causal`` (upper left) or ``window_right = 0`` (lower right), never a tensor."""
    window_left, window_right = check_window(window_size)
    seq_q, seq_k = scores_shape[-2:]
    bias_parts = _causal_bias_parts(attn_mask)
    if bias_parts is not None:
        if is_causal:
            raise AttentionArgumentError("attn_mask: CausalBias should not be used with is_causal=True")
        variant, bias_q, bias_k = bias_parts
        if (bias_q, bias_k) != (seq_q, seq_k):
            raise AttentionArgumentError(
                f"attn_mask: CausalBias is for ({bias_q}, {bias_k}) but query/key lengths are ({seq_q}, {seq_k})"
            )
        if variant == "upper_left":
            return True, (window_left, window_right), None
        return is_causal, (window_left, 0 if window_right == -1 else min(window_right, 0)), None
    if attn_mask is None:
        return is_causal, (window_left, window_right), None
    if not isinstance(attn_mask, torch.Tensor):
        raise AttentionTypeError(f"attn_mask must be a torch.Tensor or CausalBias, got {type(attn_mask).__name__}")
    if is_causal:
        raise AttentionArgumentError("attn_mask should not be set when is_causal=True (as in torch)")
    return is_causal, (window_left, window_right), _canonical_mask(attn_mask, query, scores_shape, batch_shape)


def canonicalize(
    query: object,
    key: object,
    value: object,
    attn_mask: object = None,
    dropout_p: object = 0.0,
    is_causal: object = False,
    scale: object = None,
    enable_gqa: object = False,
    *,
    window_size: object = None,
    alibi_slopes: object = None,
    softcap: object = None,
    key_lengths: object = None,
    return_lse: object = False,
    sinks: object = None,
) -> AttentionInputs:
    """Validates ``scaled_dot_product_attention`` arguments into an :class:`AttentionInputs`.

    Shaped for the common call (4-D tensors with equal batch sizes, already canonical): then it costs
    integer comparisons and no tensor op; broadcasts, reshapes and expands happen only when needed.
    """
    _check_ranks_and_flags(query, key, value, is_causal, enable_gqa, return_lse)
    assert isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)
    dropout = check_dropout(dropout_p)
    qdim, kdim, vdim = query.dim(), key.dim(), value.dim()

    qc, kc, vc, batch_shape, heads, headless = _canonical_qkv(query, key, value, enable_gqa)
    qs, ks, vs = qc.shape, kc.shape, vc.shape
    batch, seq_q, seq_k, head_dim, value_dim = qs[0], qs[2], ks[2], qs[3], vs[3]
    out_heads = () if headless else (heads,)
    causal, (window_left, window_right), mask = _visibility(
        attn_mask, is_causal, window_size, query, (*batch_shape, *out_heads, seq_q, seq_k), batch_shape
    )

    out_shape = (*batch_shape, *out_heads, seq_q, value_dim)
    out_shape = out_shape[len(out_shape) - max(qdim, kdim, vdim) :]
    alibi = None if alibi_slopes is None else check_alibi(alibi_slopes, batch, heads, qc.device)
    lengths = None if key_lengths is None else check_key_lengths(key_lengths, batch, seq_k, qc.device)
    sink_logits = None if sinks is None else check_sinks(sinks, heads, qc.device)
    features = _features(
        causal, window_left >= 0 or window_right >= 0, alibi is not None, softcap is not None,
        lengths is not None, mask, dropout > 0, ks[1] != heads, return_lse, value_dim != head_dim,
        sink_logits is not None,
    )
    return AttentionInputs(
        query=qc,
        key=kc,
        value=vc,
        attn_mask=mask,
        causal=causal,
        window_left=window_left,
        window_right=window_right,
        alibi_slopes=alibi,
        softcap=check_softcap(softcap, qc.dtype),
        key_lengths=lengths,
        dropout_p=dropout,
        scale=check_scale(scale, head_dim),
        return_lse=return_lse,
        out_shape=out_shape,
        lse_shape=out_shape[:-1],
        features=features,
        sinks=sink_logits,
    )
