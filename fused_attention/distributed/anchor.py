"""The gradient of one block of a ring through the *global* softmax, on the public attention function.

The ring's output is ``out = sum_b exp(lse_b - lse) o_b`` over key blocks ``b``. FlashAttention-style
ring backwards call a backward kernel with the global ``out`` and ``lse``; our kernels' backwards
recompute their own block softmax instead (they take no lse), and a block's own softmax gradient misses
the term that flows through its lse: ``dS = P (dP - D)`` needs the global ``P = exp(S - lse)`` and
``D = rowsum(dO * out)``, which no choice of upstream gradient alone can produce (the softmax backward
removes anything constant along a row).

So each block's backward call gets one extra *anchor* key that stands for every other block: keys and
values gain one feature column (padded to a multiple of 8 on CUDA for Triton), the anchor key is that
column's unit vector and the queries carry, in it, a per-row score ``sigma`` near the global lse. The
anchor's value is the unit vector of an extra value column, so its probability ``p*`` shows up as an
output column and its upstream gradient ``g`` adds ``p* g`` to the kernel's row sum ``delta``. With
``beta = exp(lse_k - lse)`` (``lse_k``: the augmented call's lse) the kernel's probabilities of real keys
are ``P / beta``; an upstream gradient ``[beta dO, g]`` with ``g = beta (D - R) / p*``
(``R = rowsum(dO * real output columns)``) makes the kernel's score gradient of every real key exactly
``P (dO V^T - D)``, and its ``dV`` exactly ``P^T dO``. The anchor's own gradients land in the extra columns
and are dropped. ``sigma`` only conditions the numbers (it keeps ``p*`` near 1/2): the result does not
depend on it. The cost is one extra forward per block in the backward.
"""

from __future__ import annotations

import torch

from .blocks import Block, Rules, block_mask, call_attention
from .merge import accumulation_dtype


def extra_columns(device: torch.device) -> int:
    """Feature columns added for the anchor: 1, or 8 on CUDA (Triton needs head dims in multiples of 8)."""
    return 8 if device.type == "cuda" else 1


class AnchoredQueries:
    """The local queries with their anchor score column, built once per backward."""

    def __init__(self, q: torch.Tensor, lse: torch.Tensor, rules: Rules) -> None:
        cd = accumulation_dtype(q.dtype)
        width = extra_columns(q.device)
        target = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(cd)
        cap = rules.softcap
        if cap > 0:  # the anchor's score is capped too: aim inside the cap, where tanh is invertible
            target = torch.atanh(target.clamp(-cap / 2, cap / 2) / cap) * cap
        # Clamped into the dtype's range (float16): sigma below is what the kernel will see either way.
        limit = torch.finfo(q.dtype).max / 4
        column = (target / rules.scale).clamp(-limit, limit).to(q.dtype)
        sigma = column.to(cd) * rules.scale
        if cap > 0:
            sigma = torch.tanh(sigma / cap) * cap
        self.sigma = sigma  # the anchor score the kernel sees
        self.query = torch.cat([q, column.unsqueeze(-1), q.new_zeros(*q.shape[:-1], width - 1)], dim=-1)
        self.width = width


def _with_anchor(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x (B, H, S, F)`` -> ``(B, H, 1 + S, F + width)``: a unit-vector row in front, zero columns after."""
    b, h, s, f = x.shape
    out = x.new_zeros(b, h, 1 + s, f + width)
    out[:, :, 1:, :f] = x
    out[:, :, 0, f] = 1
    return out


def block_backward(
    rules: Rules,
    block: Block,
    anchored: AnchoredQueries,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of the block's rows through the global softmax (``k``, ``v`` the key shard)."""
    rows, cols = slice(block.q0, block.q1), slice(block.k0, block.k1)
    head_dim, value_dim = k.shape[-1], v.shape[-1]
    cd = accumulation_dtype(k.dtype)
    q_aug = anchored.query[:, :, rows].detach().requires_grad_()
    k_aug = _with_anchor(k[:, :, cols], anchored.width).requires_grad_()
    v_aug = _with_anchor(v[:, :, cols], anchored.width).requires_grad_()
    mask = None
    if block.form == "mask":
        mask = block_mask(rules, block, k.device, cd if cd == torch.float64 else torch.float32)
        first = torch.ones_like(mask[..., :1]) if mask.dtype == torch.bool else torch.zeros_like(mask[..., :1])
        mask = torch.cat([first, mask], dim=-1)  # the anchor (key 0) is always visible, unbiased
    with torch.enable_grad():
        out, lse_k = call_attention(rules, block, q_aug, k_aug, v_aug, mask)
    lse_g = lse[:, :, rows]
    seen = torch.isfinite(lse_g)
    beta = torch.where(seen, torch.exp(lse_k.to(cd) - torch.where(seen, lse_g, lse_k.to(cd))), 0)
    p_anchor = torch.exp(anchored.sigma[:, :, rows] - lse_k.to(cd))
    do = dout[:, :, rows].to(cd)
    real = (do * out[..., :value_dim].to(cd)).sum(-1)
    g = beta * (delta[:, :, rows] - real) / p_anchor
    upstream = torch.cat(
        [do * beta.unsqueeze(-1), g.unsqueeze(-1), do.new_zeros(*g.shape, anchored.width - 1)], dim=-1
    ).to(out.dtype)
    del do, real, g, beta, p_anchor
    dq, dk, dv = torch.autograd.grad(out, (q_aug, k_aug, v_aug), upstream)
    return dq[..., :head_dim], dk[:, :, 1:, :head_dim], dv[:, :, 1:, :value_dim]
