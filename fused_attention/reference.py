"""The plain attention formula: the test oracle.

Dense, obvious and slow: it materializes the full ``(..., L, S)`` score matrix in the dtype of its inputs
(call it with float64 tensors for the oracle, or with 16-bit tensors to measure the rounding error of
the formula itself, as the tolerance policy in DESIGN.md does). No backend imports this module.

Conventions are those of :func:`fused_attention.scaled_dot_product_attention`: torch's SDPA semantics
for shared arguments (``is_causal`` top-left), FlashAttention's bottom-right alignment for
``window_size`` and ALiBi (query ``i`` sits at key position ``i + S - L``).
"""

from __future__ import annotations

import math

import torch


def visibility(
    seq_q: int,
    seq_k: int,
    *,
    is_causal: bool = False,
    causal_lower_right: bool = False,
    window_size: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool ``(L, S)``: True where query ``i`` may see key ``j`` under the position rules."""
    i = torch.arange(seq_q, device=device).unsqueeze(1)
    j = torch.arange(seq_k, device=device).unsqueeze(0)
    pos = i + seq_k - seq_q
    vis = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if is_causal:
        vis &= j <= i
    if causal_lower_right:
        vis &= j <= pos
    if window_size is not None:
        left, right = window_size
        if left >= 0:
            vis &= j >= pos - left
        if right >= 0:
            vis &= j <= pos + right
    return vis


def _causal_bias(attn_mask: object) -> tuple[bool, bool] | None:
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if not isinstance(attn_mask, CausalBias):
        return None
    upper = attn_mask.variant == CausalVariant.UPPER_LEFT
    return upper, not upper


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: object = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    key_lengths: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)`` computed in the inputs' dtype.

    ``dropout_mask`` is a bool keep-mask broadcastable to the score shape; kept probabilities are scaled
    by ``1 / (1 - dropout_p)``. Without it, ``dropout_p`` is ignored (the oracle has no RNG).
    ``sinks`` ``(Hq,)``: one extra key per row with score ``sinks[h]`` and no value (not scaled, capped,
    biased, masked or dropped), so it only joins the softmax denominator; gradients reach it by autograd.
    ``lse`` is the natural log of the softmax denominator over visible keys (and the sink),
    ``-inf`` for an empty row without a sink.
    """
    dtype = query.dtype
    seq_q, seq_k = query.shape[-2], key.shape[-2]
    if enable_gqa and query.dim() >= 3:  # torch groups dim -3, the heads (3-D: the leading dim)
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    if scale is None:  # (head dim 0: every score is 0 whatever the scale; 1, as the package's default)
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] > 0 else 1.0
    scores = (query @ key.transpose(-2, -1)) * scale
    # A softcap past the dtype's range is infinite there: its limit, no cap (computed, 0 * inf = NaN)
    if softcap is not None and softcap < torch.finfo(scores.dtype).max:
        scores = softcap * torch.tanh(scores / softcap)

    i = torch.arange(seq_q, device=query.device).unsqueeze(1)
    j = torch.arange(seq_k, device=query.device).unsqueeze(0)
    if alibi_slopes is not None:
        distance = (i + seq_k - seq_q - j).abs().to(dtype)
        slopes = alibi_slopes.to(dtype)
        slopes = slopes.reshape(*slopes.shape, 1, 1)
        scores = scores - slopes * distance

    causal_bias = _causal_bias(attn_mask)
    upper_left, lower_right = causal_bias if causal_bias else (False, False)
    vis = visibility(
        seq_q,
        seq_k,
        is_causal=is_causal or upper_left,
        causal_lower_right=lower_right,
        window_size=window_size,
        device=query.device,
    )
    if key_lengths is not None:
        # (B,) lengths apply to the batch dim: dim 0 of 3-D inputs, dim -4 otherwise.
        lengths = key_lengths.reshape(-1, *([1] * (2 if query.dim() == 3 else 3)))
        vis = vis & (j < lengths)
    if isinstance(attn_mask, torch.Tensor) and causal_bias is None:  # CausalBias is a Tensor subclass
        if attn_mask.dtype == torch.bool:
            vis = vis & attn_mask
        else:
            scores = scores + attn_mask.to(dtype)
    scores = scores.masked_fill(~vis, float("-inf"))
    if sinks is not None:  # the sink is one more column, dropped from the probabilities below
        sink = sinks.to(dtype).reshape(-1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)

    # A row with no visible key has lse -inf and probabilities 0; zeroing its scores first keeps the
    # logsumexp backward free of (-inf) - (-inf) = NaN.
    empty = (scores.detach().amax(dim=-1, keepdim=True) == float("-inf")) if scores.shape[-1] else None
    if empty is None:
        empty = torch.ones(*scores.shape[:-1], 1, dtype=torch.bool, device=scores.device)
    safe = scores.masked_fill(empty, 0.0)
    probs = torch.softmax(safe, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(safe, dim=-1).masked_fill(empty.squeeze(-1), float("-inf"))
    if sinks is not None:
        probs = probs[..., :-1]
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p) if dropout_p < 1 else probs * 0  # (p = 1: all dropped)
    return probs @ value, lse


def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``(total, H, D)`` attention, one sequence at a time; ``is_causal`` is bottom-right.

    Returns ``(out (total_q, H, Dv), lse (H, total_q))``.
    """
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    left, right = window_size if window_size is not None else (-1, -1)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    for b in range(len(cq) - 1):
        qs = q[cq[b] : cq[b + 1]].transpose(0, 1).unsqueeze(0)
        ks = k[ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)
        vs = v[ck[b] : ck[b + 1]].transpose(0, 1).unsqueeze(0)
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        out, lse = reference_attention(
            qs, ks, vs, scale=scale, enable_gqa=True, window_size=(left, right), alibi_slopes=slopes,
            softcap=softcap, sinks=sinks,
        )
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=-1)
