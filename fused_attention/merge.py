"""Merging partial attention results through their log-sum-exp.

Two partial results over disjoint key sets, ``(out_a, lse_a)`` and ``(out_b, lse_b)``, combine exactly:
``lse = log(exp(lse_a) + exp(lse_b))``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``.
Split-KV decoding (:mod:`fused_attention.kvcache`), context parallelism (:mod:`fused_attention.distributed`)
and users (cascade / shared-prefix attention) all merge through this module.
"""

from __future__ import annotations

import torch

from .argument_checks import check_dense_tensor, check_sinks
from .errors import AttentionArgumentError, AttentionTypeError

__all__ = ["accumulation_dtype", "merge_attention_states", "merge_attention_states_list", "merge_into_"]

_LAYOUTS = ("bhsd", "bshd")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: the precision partial results are merged in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_into_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merges ``(out (..., L, Ev), lse (..., L))`` into the accumulators, in place.

    The accumulators are in :func:`accumulation_dtype`; ``out`` may be lower precision. A side whose lse
    is -inf (it saw no key) contributes nothing; when both are -inf the row stays 0 with lse -inf (no NaN).
    """
    outs = torch.stack([acc_out, out.to(acc_out.dtype).expand_as(acc_out)])
    merged, merged_lse = _merge_stacked(outs, torch.stack([acc_lse, lse.to(acc_lse.dtype).expand_as(acc_lse)]))
    acc_out.copy_(merged)
    acc_lse.copy_(merged_lse)


def _merge_stacked(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge of parts stacked on dim 0, ``outs (parts, ..., Ev)`` and ``lses (parts, ...)``, in one pass
    over the stack: a fixed number of elementwise ops and two sums over dim 0 whatever the part count
    (a pairwise merge launched about 30 small kernels a part on a GPU, 8 ms for 32 decode splits on an
    H200). Results in accumulation dtype (the lse in float64 where it is given so); deterministic for a
    given part count."""
    acc_dtype = accumulation_dtype(outs.dtype)
    lses = lses.to(torch.promote_types(lses.dtype, acc_dtype))  # a float64 lse keeps its precision
    # finite where no part saw a key (all -inf): the weights are then exp(-inf) = 0, not NaN
    top = lses.amax(0).clamp_min(torch.finfo(acc_dtype).min)
    weights = torch.exp(lses - top)
    total = weights.sum(0)
    empty = total == 0
    safe = torch.where(empty, 1.0, total)
    # a part that saw no key contributes nothing, even where its output holds NaN (0 * NaN is NaN)
    outs = torch.where(torch.isneginf(lses).unsqueeze(-1), 0.0, outs.to(acc_dtype))
    out = (outs * (weights / safe).to(acc_dtype).unsqueeze(-1)).sum(0)
    return out, torch.where(empty, float("-inf"), top + torch.log(safe))  # log(0)'s gradient would be NaN


def _merge_aligned(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge of ``out (..., Ev)`` with ``lse`` shaped ``out.shape[:-1]``; results in accumulation dtype."""
    if len(outs) == 1:  # as _merge_stacked: a row whose lse is -inf gives 0, whatever its output holds
        acc_dtype = accumulation_dtype(outs[0].dtype)
        lse = lses[0].to(acc_dtype, copy=True)
        return torch.where(torch.isneginf(lse).unsqueeze(-1), 0.0, outs[0].to(acc_dtype)), lse
    return _merge_stacked(torch.stack(outs), torch.stack(lses))


def _with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention sinks joined to merged states ``out (B, H, L, Ev)``, ``lse (B, H, L)``: a sink is one
    more part whose lse is ``sinks[h]`` and whose output is 0. Out of place (autograd needs the inputs)."""
    parts = torch.stack([out, torch.zeros_like(out)])
    return _merge_stacked(parts, torch.stack([lse, sinks.to(lse.dtype)[:, None].expand_as(lse)]))


def fold_sinks_(acc_out: torch.Tensor, acc_lse: torch.Tensor, sinks: torch.Tensor) -> None:
    """:func:`_with_sinks` written into the accumulators."""
    out, lse = _with_sinks(acc_out, acc_lse, sinks)
    acc_out.copy_(out)
    acc_lse.copy_(lse)


def _check_states(outs: object, lses: object, layout: object) -> None:
    if layout not in _LAYOUTS:
        raise AttentionArgumentError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise AttentionTypeError("outs and lses must be lists (or tuples) of tensors")
    if not outs or len(outs) != len(lses):
        raise AttentionArgumentError(
            f"outs and lses must be non-empty and equally long, got {len(outs)} and {len(lses)}"
        )
    first_out, first_lse = outs[0], lses[0]
    for i, (out, lse) in enumerate(zip(outs, lses, strict=True)):
        for name, t in ((f"outs[{i}]", out), (f"lses[{i}]", lse)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise AttentionTypeError(f"{name} must be a floating-point torch.Tensor, got {t!r:.60}")
            check_dense_tensor(name, t)  # sparse: the merge's torch.where raised NotImplementedError
        if out.shape != first_out.shape or out.dtype != first_out.dtype or out.device != first_out.device:
            raise AttentionArgumentError(
                f"outs[{i}] must match outs[0] in shape, dtype and device, got {tuple(out.shape)} {out.dtype} "
                f"{out.device} vs {tuple(first_out.shape)} {first_out.dtype} {first_out.device}"
            )
        if lse.device != first_out.device:
            raise AttentionArgumentError(f"lses[{i}] must be on outs[0]'s device {first_out.device}, got {lse.device}")
        if lse.shape != first_lse.shape or lse.dtype != first_lse.dtype:
            raise AttentionArgumentError(
                f"lses[{i}] must match lses[0] in shape and dtype, got {tuple(lse.shape)} {lse.dtype} vs "
                f"{tuple(first_lse.shape)} {first_lse.dtype}"
            )
    if layout == "bhsd":
        if first_out.dim() < 2:
            raise AttentionArgumentError(f"layout='bhsd': out must be (..., L, Ev), at least 2-D, got {first_out.dim()}-D")
        expected = tuple(first_out.shape[:-1])
        if tuple(first_lse.shape) != expected:
            hint = ""
            if first_out.dim() == 3 and tuple(first_lse.shape) == expected[::-1]:
                hint = " (varlen_attention's lse is (H, T) for out (T, H, D): pass layout='bshd')"
            raise AttentionArgumentError(
                f"layout='bhsd': lse must have out's shape without its last dim {expected}, got "
                f"{tuple(first_lse.shape)}{hint}"
            )
    elif first_out.dim() == 3:  # packed (T, H, D) with (H, T), as varlen_attention returns them
        t, h, _ = first_out.shape
        if tuple(first_lse.shape) != (h, t):
            raise AttentionArgumentError(
                f"layout='bshd': lse must be (H, T) = {(h, t)} for packed out (T, H, D), got {tuple(first_lse.shape)}"
            )
    else:
        if first_out.dim() != 4:
            raise AttentionArgumentError(
                f"layout='bshd': out must be (B, L, H, D) or packed (T, H, D), got {first_out.dim()}-D"
            )
        b, seq, h, _ = first_out.shape
        if tuple(first_lse.shape) != (b, h, seq):
            raise AttentionArgumentError(
                f"layout='bshd': lse must be (B, H, L) = {(b, h, seq)} for out (B, L, H, D), got "
                f"{tuple(first_lse.shape)}"
            )


def merge_attention_states_list(
    outs: list[torch.Tensor] | tuple[torch.Tensor, ...],
    lses: list[torch.Tensor] | tuple[torch.Tensor, ...],
    *,
    layout: str = "bhsd",
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over the union of disjoint key sets, from each set's ``(out, lse)``.

    Exact: ``lse = log(sum_i exp(lse_i))`` and ``out = sum_i exp(lse_i - lse) out_i``, computed in float32
    (float64 for float64 outputs) with the running maximum subtracted, so large lse values do not
    overflow. A part whose lse is ``-inf`` (it saw no key) contributes nothing; a row that no part saw
    gives output 0 and lse ``-inf`` (never NaN). The inputs are not modified.

    Args:
        outs: partial outputs, all of one shape, dtype and device.
            ``layout="bhsd"``: any shape ``(..., Ev)``, e.g. ``(B, H, L, Ev)`` as
            :func:`fused_attention.scaled_dot_product_attention` returns it, or packed ``(T, H, Ev)``.
            ``layout="bshd"``: ``(B, L, H, Ev)``, as :func:`fused_attention.attention_with_kvcache`
            returns it in its default layout, or packed ``(T, H, Ev)``, as
            :func:`fused_attention.varlen_attention` returns it.
        lses: their natural-log log-sum-exps (``return_lse=True``), all of one shape and dtype:
            ``out.shape[:-1]`` for ``"bhsd"``; ``(B, H, L)`` for ``"bshd"`` (``(H, T)`` when packed,
            as ``varlen_attention`` returns it).
        layout: ``"bhsd"`` (default) or ``"bshd"``, as above.
        sinks: attention sinks ``(H,)`` (float32), joined once to the merged result, for parts computed
            without them (split-KV); needs 4-D outputs (``(B, H, L, Ev)`` or ``(B, L, H, Ev)``). The
            returned lse then includes the sink, as ``scaled_dot_product_attention(..., sinks=)``'s does.

    Returns:
        ``(out, lse)`` shaped like the inputs, ``out`` in the outputs' dtype and ``lse`` in the lses'
        dtype.
    """
    _check_states(outs, lses, layout)
    outs, lses = list(outs), list(lses)
    if layout == "bshd":  # (B, L, H, D) with (B, H, L), or (T, H, D) with (H, T): merge in the H-first view
        outs = [o.transpose(-3, -2) for o in outs]
    acc_out, acc_lse = _merge_aligned(outs, lses)
    if sinks is not None:
        if acc_out.dim() != 4:
            raise AttentionArgumentError(
                f"sinks need 4-D outputs (B, H, L, Ev) or (B, L, H, Ev), got {acc_out.dim()}-D"
            )
        acc_out, acc_lse = _with_sinks(acc_out, acc_lse, check_sinks(sinks, acc_out.shape[1], acc_out.device))
    out = acc_out.to(outs[0].dtype)
    if layout == "bshd":
        out = out.transpose(-3, -2).contiguous()
    return out, acc_lse.to(lses[0].dtype)


def merge_attention_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    layout: str = "bhsd",
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges two partial attention results over disjoint key sets into the attention over both.

    ``lse = log(exp(lse_a) + exp(lse_b))``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``:
    see :func:`merge_attention_states_list` for shapes (``layout="bhsd"``: lse is ``out.shape[:-1]``;
    ``"bshd"``: out ``(B, L, H, Ev)`` with lse ``(B, H, L)``), precision, ``-inf`` handling, dtypes and ``sinks``.
    """
    return merge_attention_states_list([out_a, out_b], [lse_a, lse_b], layout=layout, sinks=sinks)
