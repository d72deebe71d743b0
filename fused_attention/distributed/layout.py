"""Sequence layouts: which global positions each rank of a context-parallel group holds.

``"contiguous"``: rank ``r`` holds the ``r``-th of ``P`` consecutive pieces (``torch.tensor_split``
sizes: the first ``L % P`` ranks hold one more token). ``"zigzag"``: the sequence is cut into ``2P``
equal chunks and rank ``r`` holds chunk ``r`` followed by chunk ``2P - 1 - r``, so under a causal mask
every rank does the same work (``L`` must be divisible by ``2P``). Within a shard positions always
increase, which lets a rank run causal attention of its shard against itself as one local causal call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import AttentionArgumentError, AttentionTypeError
from .groups import resolve_group
from .validate import exchange_signatures

LAYOUTS = ("zigzag", "contiguous")

Segments = tuple[tuple[int, int], ...]  # (global start, length) pieces of one shard, in local order


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise AttentionArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return str(layout)


def check_divisible(layout: str, length: int, world: int) -> None:
    """Zigzag needs ``2P`` equal chunks; every layout needs a token per rank."""
    if layout == "zigzag" and length % (2 * world):
        raise AttentionArgumentError(
            f"layout='zigzag' needs a sequence length divisible by 2 * group size = {2 * world}, got {length}; "
            "pad the sequence or use layout='contiguous'"
        )
    if length < world:
        raise AttentionArgumentError(f"sequence length {length} is shorter than the group size {world}")


def contiguous_lengths(length: int, world: int) -> list[int]:
    base, extra = divmod(length, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def shard_segments(layout: str, shard_lengths: list[int]) -> list[Segments]:
    """Segments of every rank, from every rank's shard length (their sum is the sequence length)."""
    world = len(shard_lengths)
    if layout == "zigzag":
        chunk = shard_lengths[0] // 2
        return [((r * chunk, chunk), ((2 * world - 1 - r) * chunk, chunk)) for r in range(world)]
    starts = [sum(shard_lengths[:r]) for r in range(world)]
    return [((starts[r], shard_lengths[r]),) for r in range(world)]


def positions(segments: Segments, device: torch.device | None = None) -> torch.Tensor:
    """Global positions of a shard's tokens, in local order (int64)."""
    return torch.cat([torch.arange(start, start + n, device=device) for start, n in segments])


def _dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise AttentionArgumentError(f"dim {dim} is out of range for a {x.dim()}-D tensor")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, group: Any = None, layout: str = "zigzag", dim: int = -2) -> torch.Tensor:
    """This rank's shard of a whole sequence held by every rank (no communication).

    Args:
        x: the whole sequence, identical on every rank (inputs, labels, position ids alike).
        group: a ``ProcessGroup``, a 1-D ``DeviceMesh`` or None (the default group).
        layout: ``"zigzag"`` (chunks ``r`` and ``2P - 1 - r`` of ``2P``; the length must be divisible by
            ``2P``) or ``"contiguous"`` (the ``r``-th of ``P`` consecutive pieces; any length >= ``P``,
            the first ``L % P`` ranks get one more token).
        dim: the sequence dimension; default -2, the ``(batch, heads, seq, head_dim)`` layout of
            :func:`ring_attention`. Use 1 for ``(batch, seq)`` labels or position ids.

    Returns:
        A new contiguous tensor (``x`` is not aliased, so writing to the shard never changes ``x``).
    """
    pg = resolve_group(group)
    layout = check_layout(layout)
    d = _dim(x, dim)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    check_divisible(layout, x.shape[d], world)
    lengths = [x.shape[d] // world] * world if layout == "zigzag" else contiguous_lengths(x.shape[d], world)
    pieces = [x.narrow(d, start, n) for start, n in shard_segments(layout, lengths)[rank]]
    return torch.cat(pieces, dim=d).contiguous()


_MAX_DIMS = 16
_SHARD_FIELDS = ("layout", "dims", "dim", "dtype", "length", *(f"size of dim {i}" for i in range(1, _MAX_DIMS)))
_DTYPES = tuple(sorted((t for t in vars(torch).values() if isinstance(t, torch.dtype)), key=str))


def _shard_signature(x: object, layout: object, dim: int) -> dict[str, float]:
    lay = check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise AttentionTypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    d = _dim(x, dim)
    if x.dim() > _MAX_DIMS:
        raise AttentionArgumentError(f"x has {x.dim()} dims; unshard_sequence takes at most {_MAX_DIMS}")
    shape = x.movedim(d, 0).shape
    sizes = {f"size of dim {i}": shape[i] if i < len(shape) else -1 for i in range(1, _MAX_DIMS)}
    return {"layout": LAYOUTS.index(lay), "dims": x.dim(), "dim": d, "dtype": _DTYPES.index(x.dtype), "length": shape[0], **sizes}


def unshard_sequence(x: torch.Tensor, group: Any = None, layout: str = "zigzag", dim: int = -2) -> torch.Tensor:
    """The whole sequence from every rank's shard (an all-gather; the inverse of :func:`shard_sequence`).

    Every rank must call it with its shard (same layout, dim and dtype; shards may differ in length only
    along ``dim`` and only for ``"contiguous"``; checked collectively: a mismatch raises on every rank).
    Returns the whole sequence in global order on every rank.
    Not differentiable: it is for outputs, metrics and tests (gradients flow through
    :func:`ring_attention` / :func:`ulysses_attention` on the shards).
    """
    pg = resolve_group(group)
    world = dist.get_world_size(pg)
    lay = layout if layout in LAYOUTS else "zigzag"
    # Shapes, dtypes and lengths checked collectively before the gather: gloo aborts the process on
    # buffers of different sizes, and zigzag shards of unequal or odd lengths left tokens unwritten.
    signatures = exchange_signatures(
        pg, "unshard_sequence", _SHARD_FIELDS, lambda: _shard_signature(x, layout, dim),
        frozenset({"length"}) if lay == "contiguous" else frozenset(),
    )
    lengths = [int(s["length"]) for s in signatures]
    if lay == "zigzag":
        check_divisible(lay, sum(lengths), world)
    d = _dim(x, dim)
    moved = x.movedim(d, 0)
    # all_gather needs equal sizes (gloo checks): uneven contiguous shards travel padded to the longest.
    padded = moved.new_zeros((max(lengths), *moved.shape[1:]))
    padded[: moved.shape[0]] = moved
    buffers = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(buffers, padded, group=pg)
    segments = shard_segments(layout, lengths)
    whole = moved.new_empty((sum(lengths), *moved.shape[1:]))
    for buffer, shard in zip(buffers, segments, strict=True):
        offset = 0
        for start, n in shard:
            whole[start : start + n] = buffer[offset : offset + n]
            offset += n
    return whole.movedim(0, d)
