"""The error column: max ``|out - reference|`` against the float64 oracle, on sampled query rows when
the full score matrix would be large."""

from __future__ import annotations

import math

import torch

from ..reference import reference_attention
from .case import Case, dense_mask

FULL_REFERENCE_MAX_SCORES = 1 << 24  # B*H*L*S above this: compare sampled query rows only
SAMPLED_ROWS = 64


def sample_rows(seq_q: int, batch_heads: int) -> torch.Tensor | None:
    """None (every row) for small problems, else ``SAMPLED_ROWS`` spread rows including the first and last."""
    if seq_q <= SAMPLED_ROWS or batch_heads * seq_q * seq_q <= FULL_REFERENCE_MAX_SCORES:
        return None
    return torch.linspace(0, seq_q - 1, SAMPLED_ROWS).round().long().unique()


def reference_output(case: Case, rows: torch.Tensor | None) -> torch.Tensor:
    """float64 CPU reference output for ``rows`` (all when None) of ``case``."""
    spec = case.spec
    q, k, v = (t.detach().cpu().double() for t in case.grad_inputs())
    if rows is None:
        kwargs = dict(case.kwargs)
        if "alibi_slopes" in kwargs:
            kwargs["alibi_slopes"] = kwargs["alibi_slopes"].cpu()
        return reference_attention(q, k, v, **kwargs)[0]
    # A subset of query rows loses the row positions the oracle's own rules read, so the op's
    # position rules come in as the equivalent dense mask for exactly these rows.
    slopes = case.kwargs.get("alibi_slopes")
    mask = dense_mask(spec, None if slopes is None else slopes.cpu(), torch.float64, "cpu", rows)
    return reference_attention(q[:, :, rows], k, v, attn_mask=mask)[0]


def max_error(out: torch.Tensor, reference: torch.Tensor, rows: torch.Tensor | None) -> float:
    """Max abs difference (NaN anywhere gives NaN: a broken kernel must not look accurate)."""
    out = out.detach()
    if rows is not None:
        out = out[:, :, rows.to(out.device)]
    if out.shape != reference.shape:
        return math.nan
    diff = (out.cpu().double() - reference).abs()
    if torch.isnan(diff).any():
        return math.nan
    return float(diff.max()) if diff.numel() else 0.0
