"""The error columns: max ``|out - reference|`` and max gradient error against the float64 oracle, on
sampled query rows when the full score matrix would be large.

With sampled rows the upstream gradient is zero outside them, so the provider's gradients and the
oracle's (computed on those rows only) are the same functions: every gradient is compared whole."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..reference import reference_attention, reference_varlen_attention, visibility
from .case import Case, dense_mask

FULL_REFERENCE_MAX_SCORES = 1 << 24  # B*H*L*S above this: compare sampled query rows only
SAMPLED_ROWS = 64


@dataclass
class Expected:
    """float64 CPU reference: the output at the compared rows, and the input gradients (or None)."""

    out: torch.Tensor
    grads: tuple[torch.Tensor, ...] | None = None


def _spread_rows(n: int) -> torch.Tensor:
    return torch.linspace(0, n - 1, SAMPLED_ROWS).round().long().unique()


def sample_rows(seq_q: int, batch_heads: int) -> torch.Tensor | None:
    """None (every row) for small problems, else ``SAMPLED_ROWS`` spread rows including the first and last."""
    if seq_q <= SAMPLED_ROWS or batch_heads * seq_q * seq_q <= FULL_REFERENCE_MAX_SCORES:
        return None
    return _spread_rows(seq_q)


def case_rows(case: Case) -> torch.Tensor | None:
    """The query rows the error columns compare for ``case`` (packed tokens for varlen)."""
    spec = case.spec
    if not case.is_varlen:
        return sample_rows(spec.seq_q, spec.batch * spec.heads)
    total = case.query.shape[0]
    scores = spec.heads * sum(n * n for n in spec.seq_lengths)
    return None if total <= SAMPLED_ROWS or scores <= FULL_REFERENCE_MAX_SCORES else _spread_rows(total)


def only_rows(t: torch.Tensor, rows: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``t`` with zeros outside ``rows`` along ``dim`` (an upstream gradient for sampled rows)."""
    if rows is None:
        return t
    keep = torch.zeros(t.shape[dim], dtype=torch.bool, device=t.device)
    keep[rows.to(t.device)] = True
    shape = [1] * t.dim()
    shape[dim] = -1
    return t * keep.reshape(shape)


def _reference_out(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None):
    """The oracle's output on float64 CPU ``q, k, v`` for ``rows`` of ``case`` (all when None)."""
    if case.is_varlen:
        cu = case.cu_seqlens.cpu()
        if rows is None:
            return reference_varlen_attention(q, k, v, cu, cu, is_causal=True)[0]
        outs = []
        for start, end in case.sequences():
            local = rows[(rows >= start) & (rows < end)] - start
            if not len(local):
                continue
            n = end - start
            mask = visibility(n, n, is_causal=True)[local]
            qs = q[start + local].transpose(0, 1)  # (H, rows, D): one sequence, batch-free
            ks, vs = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
            outs.append(reference_attention(qs, ks, vs, attn_mask=mask)[0].transpose(0, 1))
        return torch.cat(outs, dim=0)
    if rows is None:
        kwargs = dict(case.kwargs)
        for name in ("alibi_slopes", "attn_mask", "sinks"):
            if name in kwargs:
                kwargs[name] = kwargs[name].detach().cpu().double()
        if "key_lengths" in kwargs:
            kwargs["key_lengths"] = kwargs["key_lengths"].cpu()
        return reference_attention(q, k, v, **kwargs)[0]
    # A subset of query rows loses the row positions the oracle's own rules read, so the op's position
    # rules (and its masks) come in as the equivalent dense mask for exactly these rows.
    mask = dense_mask(case, torch.float64, "cpu", rows)
    kept = {n: case.kwargs[n] for n in ("softcap", "enable_gqa") if n in case.kwargs}
    if "sinks" in case.kwargs:
        kept["sinks"] = case.kwargs["sinks"].detach().cpu().double()
    return reference_attention(q[:, :, rows], k, v, attn_mask=mask, **kept)[0]


def reference(case: Case, rows: torch.Tensor | None, grad_out: torch.Tensor | None = None) -> Expected:
    """float64 CPU reference for ``rows`` of ``case``; with ``grad_out`` (the full upstream gradient,
    zero outside ``rows``) also the gradients of query, key and value."""
    inputs = [t.detach().cpu().double().requires_grad_(grad_out is not None) for t in case.grad_inputs()]
    with torch.set_grad_enabled(grad_out is not None):
        out = _reference_out(case, *inputs, rows)
        if grad_out is None:
            return Expected(out.detach())
        upstream = grad_out.detach().cpu().double()
        if rows is not None:
            upstream = upstream.index_select(case.row_dim, rows)
        grads = torch.autograd.grad(out, inputs, upstream)
    return Expected(out.detach(), tuple(grads))


def max_error(out: torch.Tensor, reference: torch.Tensor, rows: torch.Tensor | None, dim: int = 2) -> float:
    """Max abs difference at ``rows`` along ``dim`` (NaN anywhere gives NaN: a broken kernel must not
    look accurate; a wrong shape gives NaN too)."""
    out = out.detach()
    if rows is not None:
        out = out.index_select(dim, rows.to(out.device))
    if out.shape != reference.shape:
        return math.nan
    diff = (out.cpu().double() - reference).abs()
    if torch.isnan(diff).any():
        return math.nan
    return float(diff.max()) if diff.numel() else 0.0


def max_grad_error(grads: tuple[torch.Tensor | None, ...], expected: tuple[torch.Tensor, ...]) -> float:
    """The largest of the per-input max errors (NaN if any gradient is missing or broken)."""
    errors = [math.nan if g is None else max_error(g, e, None) for g, e in zip(grads, expected)]
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)
