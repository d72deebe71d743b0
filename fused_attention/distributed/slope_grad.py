"""The ALiBi slopes' gradient of a ring, from float64 row sums over its blocks.

``d slope = -sum_ij dS_ij |i - j|`` with ``dS = P (dP - D)``. Read off each block's float mask gradient,
that sum multiplies every rounding of ``dS`` (the kernel's, and those of ``D`` and of the block's shifted
call, which move a row's ``dS`` by a multiple of its ``P``) by global distances of up to the whole
sequence: float32 rings missed the float32 reference's error by up to 9x (contiguous, 3 ranks, 48 tokens,
20 seeds). So the ring sums, per query row, in float64, over every block it visits:

    Z = sum_j P_ij,  B = sum_j P_ij d_ij,  R = sum_j P_ij dP_ij,  A = sum_j P_ij dP_ij d_ij

with ``P = exp(S - lse)`` from the global lse and ``dP = dO V^T``; after the last block, ``n = Z + p_sink``
is the exact normaliser of these ``P``, ``D = R / n`` the row's delta consistent with them, and

    d slope = -sum_i (A_i - D_i B_i) / n_i.

The cost, only when the slopes require grad: the block's scores and ``dP`` once more, in float64.
"""

from __future__ import annotations

import torch

from .blocks import Block, Rules, block_mask, block_offsets


class SlopeSums:
    """Float64 row sums ``(Z, B, R, A)`` of this rank's ``(B, Hq, Lq)`` query rows."""

    def __init__(self, q: torch.Tensor):
        self.sums = torch.zeros(4, *q.shape[:-1], dtype=torch.float64, device=q.device)

    def heads(self, heads: slice) -> SlopeSums:
        """The sums of query heads ``heads``, sharing this object's storage."""
        part = SlopeSums.__new__(SlopeSums)
        part.sums = self.sums[:, :, heads]
        return part

    def add(self, rules: Rules, block: Block, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            dout: torch.Tensor, lse: torch.Tensor) -> None:
        """One ``mask`` block (ALiBi blocks are): rows ``q0:q1`` of ``q``/``dout``/``lse`` (global lse)
        against keys ``k0:k1`` of the shard ``k``/``v`` it holds."""
        rows, cols = slice(block.q0, block.q1), slice(block.k0, block.k1)
        k, v = k[:, :, cols].double(), v[:, :, cols].double()
        if k.shape[1] != q.shape[1]:  # grouped heads: each key head serves a group of query heads
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        scores = torch.matmul(q[:, :, rows].double(), k.transpose(-2, -1)) * rules.scale
        if rules.softcap:
            scores = torch.tanh(scores / rules.softcap) * rules.softcap
        scores = scores + block_mask(rules, block, q.device, torch.float64)  # ALiBi bias, -inf where hidden
        lse_rows = lse[:, :, rows].double()
        p = torch.exp(scores - torch.where(torch.isfinite(lse_rows), lse_rows, 0).unsqueeze(-1))
        del scores
        p_dp = p * torch.matmul(dout[:, :, rows].double(), v.transpose(-2, -1))
        distance = block_offsets(block, q.device).abs().double()
        z, b, r, a = self.sums[:, :, :, rows]
        z += p.sum(-1)
        b += (p * distance).sum(-1)
        r += p_dp.sum(-1)
        a += (p_dp * distance).sum(-1)

    def gradient(self, lse: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
        """``(B, Hq)``: this rank's rows' share of the slopes' gradient."""
        z, b, r, a = self.sums
        n = z
        if sinks is not None:
            lse64 = lse.double()
            n = n + torch.exp(sinks.double()[:, None] - torch.where(torch.isfinite(lse64), lse64, 0))
        n = torch.where(n > 0, n, 1)  # a row that sees nothing: every sum is 0
        return -((a - r / n * b) / n).sum(-1)
