"""Public attention functions: validate and canonicalize once, then dispatch to a backend."""

from __future__ import annotations

from typing import Any

import torch

from .backends import select
from .backends.plain_call import plain_cpu_attention
from .inputs import canonicalize
from .varlen_inputs import canonicalize_varlen

__all__ = ["scaled_dot_product_attention", "varlen_attention"]


def _autocast_device_types() -> frozenset[str]:
    names = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu", torch._C._get_privateuse1_backend_name())
    available = set()
    for name in names:
        try:
            if torch.amp.is_autocast_available(name):
                available.add(name)
        except RuntimeError:  # a device type this torch does not know
            pass
    return frozenset(available)


# Asked once here: torch.compile on torch 2.6 cannot trace torch.amp.is_autocast_available (a graph break).
_AUTOCAST_DEVICE_TYPES = _autocast_device_types()


def _autocast(*tensors: Any) -> list[Any]:
    """Under autocast, cast as torch's SDPA does (a lower-precision op): float32/16 tensors to the autocast dtype."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return list(tensors)
    if not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled():
        return list(tensors)  # the common case, in one C call
    device_type = first.device.type
    # is_autocast_enabled raises for device types without autocast (meta): those are never autocast.
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return list(tensors)
    from torch.nn.attention.bias import CausalBias  # lazy: it imports torch._dynamo (seconds)

    dtype = torch.get_autocast_dtype(device_type)
    return [
        t.to(dtype)
        if isinstance(t, torch.Tensor) and not isinstance(t, CausalBias) and t.is_floating_point()
        and t.dtype != torch.float64 and t.device.type == device_type
        else t
        for t in tensors
    ]


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    key_lengths: torch.Tensor | None = None,
    return_lse: bool = False,
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Scaled dot-product attention: a drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Computes ``softmax(mask(bias(cap(Q K^T * scale)))) V`` without materializing the ``L x S`` matrix
    on any backend, on the fastest backend that serves the call (see ``python -m fused_attention info``).

    Args:
        query: ``(N, ..., Hq, L, E)``; also ``(N, L, E)`` (one head) or ``(L, E)``.
            float16, bfloat16, float32 or float64.
        key: ``(N, ..., Hkv, S, E)``; same dtype and device as ``query``.
        value: ``(N, ..., Hkv, S, Ev)``; ``Ev`` may differ from ``E``. Its length must equal the key's
            (torch's CPU SDPA silently accepts a mismatch; we reject it).
            Batch dimensions (and heads, without ``enable_gqa``) of query, key and value broadcast, as
            in torch; broadcast tensors are read through their strides, not copied (except a mixed
            broadcast over several batch dimensions, which cannot be one strided dimension).
        attn_mask: bool (True = attend), float (added to the scores; float32 or the query dtype), or a
            ``torch.nn.attention.bias.CausalBias`` (``causal_upper_left`` / ``causal_lower_right``,
            applied without materializing it). Any shape broadcastable to ``(N, ..., Hq, L, S)``; it is
            read through broadcast strides, never expanded. A float mask that requires grad receives
            its gradient, reduced over its broadcast dimensions.
        dropout_p: dropout probability in [0, 1] on the attention weights (at 1 all are dropped and the
            output is 0, as in torch), applied whenever > 0 (as torch's functional form does; pass 0.0
            in eval). Drawn from torch's default generator:
            ``torch.manual_seed`` reproduces it. The seed is drawn on the host per call, so a call
            captured in a CUDA graph (``torch.cuda.graph``) replays the mask it was captured with.
        is_causal: causal mask aligned top-left as in torch (query ``i`` sees keys ``j <= i``). As in
            torch, it cannot be combined with ``attn_mask``; it combines (AND) with every extension.
        scale: score scale; default ``1 / sqrt(E)``.
        enable_gqa: grouped-query attention: ``Hq`` must be a multiple of ``Hkv``; query head ``h``
            reads key/value head ``h // (Hq // Hkv)``. K and V are never repeated in memory.

    Keyword-only extensions (FlashAttention conventions: bottom-right alignment, query ``i`` sits at
    key position ``pos = i + S - L``; ``key_lengths`` never shifts positions):
        window_size: ``(left, right)``: key ``j`` is visible iff ``pos - left <= j <= pos + right``;
            -1 leaves that side unbounded. ``(-1, 0)`` is bottom-right causal.
        alibi_slopes: float32 ``(Hq,)`` or ``(B, Hq)`` (B = the flattened batch): adds
            ``-slope * |pos - j|`` to the score.
        softcap: ``score = softcap * tanh(score / softcap)``, applied to the scaled score before bias
            and masks. Must be > 0; from ``2**64`` on (``2**512`` for float64 inputs) it caps no score the
            computation can tell apart and the call runs without it.
        key_lengths: int32/int64 ``(B,)``: keys ``j >= key_lengths[b]`` are masked (padding without a
            dense mask). Values must lie in ``[0, S]``.
        return_lse: also return the log-sum-exp.
        sinks: learned attention sinks (gpt-oss, StreamingLLM): float32 ``(Hq,)`` (float64 accepted),
            one logit per query head. Each row's softmax gains one more "key" with score ``sinks[h]``
            and no value: ``out = sum_j exp(s_j) v_j / (exp(sinks[h]) + sum_j exp(s_j))``. The sink is
            not scaled, capped, biased, masked or dropped; a row that sees no key outputs 0. It gets an
            exact gradient (summed over batch and rows) when it requires grad. ``-inf`` turns a head's
            sink off; NaN or ``+inf`` raise.
        backend: force ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"`` (else
            ``FUSED_ATTENTION_BACKEND``, else automatic); a forced backend that cannot serve the call
            raises ``ValueError`` listing its reasons.

    All masks (causal, window, key lengths, attn_mask) are ANDed. A row with no visible key yields
    output 0 and zero gradients (never NaN), and lse ``-inf``. Under ``torch.autocast`` the inputs are
    cast as torch's SDPA casts them.

    Returns:
        ``out`` of shape ``(N, ..., Hq, L, Ev)`` in the query dtype; with ``return_lse=True``,
        ``(out, lse)`` where ``lse`` has shape ``out.shape[:-1]``, float32 (float64 for float64
        inputs), natural log of the softmax denominator over visible keys before dropout, detached.
        With ``sinks`` the denominator includes the sink's ``exp(sinks[h])`` (so an empty row's lse is
        ``sinks[h]``): attention over two key sets merges from their lses as usual, with the sink
        counted once.

    Raises:
        ValueError / TypeError naming the bad argument (the classes also derive from RuntimeError, so
        code written for torch's errors keeps working).
    """
    if (
        attn_mask is None and backend is None and window_size is None and alibi_slopes is None and softcap is None
        and key_lengths is None and sinks is None and return_lse is False and type(dropout_p) is float
        and dropout_p == 0.0
    ):
        out = plain_cpu_attention(query, key, value, is_causal, scale, enable_gqa)
        if out is not None:
            return out
    query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    inputs = canonicalize(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
        window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap, key_lengths=key_lengths,
        return_lse=return_lse, sinks=sinks,
    )
    out, lse = select(inputs, backend).attention(inputs)
    if out.shape != inputs.out_shape:
        out = out.reshape(inputs.out_shape)
    if not return_lse:
        return out
    assert lse is not None, "backends compute lse whenever 'lse' is among the features"
    return out, lse.detach().reshape(inputs.lse_shape)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    is_causal: bool = False,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Attention over packed variable-length sequences (FlashAttention's varlen API).

    Args:
        q: ``(total_q, Hq, E)``: the batch's query sequences concatenated along dim 0.
        k: ``(total_k, Hkv, E)``; ``Hq`` must be a multiple of ``Hkv`` (GQA by head counts: query
            head ``h`` reads key/value head ``h // (Hq // Hkv)``).
        v: ``(total_k, Hkv, Ev)``.
        cu_seqlens_q: int32/int64 ``(B + 1,)``: cumulative query lengths, starting at 0 and ending at
            ``total_q``; sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``.
        cu_seqlens_k: int32/int64 ``(B + 1,)``, the same for keys and values.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence.
        dropout_p: dropout probability in [0, 1], drawn from torch's default generator.
        scale: score scale; default ``1 / sqrt(E)``.
        is_causal: causal mask aligned bottom-right **per sequence** (FlashAttention's rule, unlike
            ``scaled_dot_product_attention``'s top-left ``is_causal``): query ``i`` of a sequence with
            ``L`` queries and ``S`` keys sees keys ``j <= i + S - L``.
        window_size: ``(left, right)``, bottom-right aligned per sequence; -1 = unbounded.
        alibi_slopes: float32 ``(Hq,)`` or ``(B, Hq)``.
        softcap: ``score = softcap * tanh(score / softcap)``; must be > 0 (as in
            :func:`scaled_dot_product_attention`, a softcap too large to cap anything is none).
        return_lse: also return the log-sum-exp (including the sink's term with ``sinks``).
        sinks: float32 ``(Hq,)`` learned sink logits, as in :func:`scaled_dot_product_attention`.
        backend: force a backend (see :func:`scaled_dot_product_attention`).

    Values of ``cu_seqlens`` are checked for CPU tensors, and for CUDA tensors only when
    ``FUSED_ATTENTION_CHECKS=1`` (checking forces a device sync).

    Returns:
        ``out`` ``(total_q, Hq, Ev)``; with ``return_lse=True``, ``(out, lse)`` where ``lse`` is
        ``(Hq, total_q)``, float32 (float64 for float64 inputs), detached; ``-inf`` for rows that see
        no key. Rows that see no key give output 0.
    """
    q, k, v = _autocast(q, k, v)
    inputs = canonicalize_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p, scale=scale,
        is_causal=is_causal, window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap,
        return_lse=return_lse, sinks=sinks,
    )
    out, lse = select(inputs, backend).varlen_attention(inputs)
    return (out, lse.detach()) if return_lse else out
