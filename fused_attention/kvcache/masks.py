"""What each query row may see in the gathered keys, with the cache's bottom-right alignment.

Key ``j`` is sequence position ``j``; batch entry ``b`` holds ``total[b] = cache_seqlens[b] + Lnew`` keys
and query row ``i`` sits at ``p = total[b] - Lq + i``. ``scaled_dot_product_attention`` aligns queries
to the key tensor's length, not to ``total[b]``, so position rules are passed as a mask built here.
"""

from __future__ import annotations

import torch

from .validate import KVCacheCall


def needs_positions(call: KVCacheCall) -> bool:
    """False when ``key_lengths = total`` alone says what each row sees (plain decoding)."""
    causal_matters = call.is_causal and call.q.shape[1] > 1  # one row at p = total - 1 sees all keys < total
    return causal_matters or call.window != (-1, -1) or call.alibi_slopes is not None or call.leftpad is not None


def visible_window(call: KVCacheCall) -> tuple[int, int]:
    """``(left, right)`` keys a query sees around its own position, causal folded in (right at most 0)."""
    left, right = call.window
    if call.is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def position_mask(call: KVCacheCall, total: torch.Tensor, seq_k: int, dtype: torch.dtype) -> torch.Tensor:
    """Bool ``(B, 1, Lq, S_k)`` (True = attend), or with ALiBi a float ``(B, Hq, Lq, S_k)`` bias that is
    ``-inf`` where masked."""
    seq_q = call.q.shape[1]
    device = total.device
    j = torch.arange(seq_k, device=device)
    p = (total.unsqueeze(1) - seq_q + torch.arange(seq_q, device=device)).unsqueeze(-1)  # (B, Lq, 1)
    vis = j < total.view(-1, 1, 1)
    if call.leftpad is not None:
        vis = vis & (j >= call.leftpad.view(-1, 1, 1))
    left, right = visible_window(call)
    if left >= 0:
        vis = vis & (j >= p - left)
    if right >= 0:
        vis = vis & (j <= p + right)
    vis = vis.unsqueeze(1)
    if call.alibi_slopes is None:
        return vis
    slopes = call.alibi_slopes.to(dtype).view(call.alibi_slopes.shape[0], -1, 1, 1)
    bias = -slopes * (p - j).abs().to(dtype).unsqueeze(1)
    return bias.masked_fill(~vis, float("-inf"))
