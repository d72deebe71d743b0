"""Collective argument checks: a bad argument on one rank raises on every rank instead of hanging.

Each rank checks its own arguments, then all ranks exchange a small signature (one all-gather of a
float64 vector): whether the local check passed, and the values every rank must share. A rank whose
check failed re-raises its own error; the others raise an error naming the failing ranks. Arguments
that differ between ranks (shapes, options) raise on every rank, naming the first difference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
import torch.distributed as dist

from ..errors import AttentionArgumentError
from .groups import comm_device


def exchange_signatures(
    pg: dist.ProcessGroup,
    what: str,
    fields: tuple[str, ...],
    local: Callable[[], dict[str, float]],
    may_differ: frozenset[str] = frozenset(),
    shown: Mapping[str, Callable[[float], str]] = MappingProxyType({}),
) -> list[dict[str, float]]:
    """Runs ``local()`` (the rank's own checks, returning its signature) and all-gathers the signatures.

    Returns every rank's signature (rank order) once all ranks passed and agree on every field not in
    ``may_differ``; otherwise raises on every rank. ``shown``: how a mismatch message writes a field's
    value (fields that travel as a number standing for a name or a flag).
    """
    error: BaseException | None = None
    try:
        mine = local()
        values = [1.0, *(float(mine[f]) for f in fields)]
    except Exception as e:  # noqa: BLE001 - any local failure must reach the other ranks, not strand them
        error = e
        values = [0.0] * (len(fields) + 1)
    world = dist.get_world_size(pg)
    device = comm_device(pg)
    local_tensor = torch.tensor(values, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local_tensor) for _ in range(world)]
    dist.all_gather(gathered, local_tensor, group=pg)
    rows = [g.tolist() for g in gathered]
    failed = [r for r, row in enumerate(rows) if row[0] == 0.0]
    if error is not None:
        raise error
    if failed:
        raise AttentionArgumentError(
            f"{what}: rank(s) {failed} of the group got invalid arguments (see the error raised there); "
            "every rank stops"
        )
    signatures = [dict(zip(fields, row[1:], strict=True)) for row in rows]
    for name in fields:
        if name in may_differ:
            continue
        for r, sig in enumerate(signatures[1:], start=1):
            if sig[name] != signatures[0][name]:
                show = shown.get(name, lambda value: f"{value:g}")
                raise AttentionArgumentError(
                    f"{what}: {name} differs across ranks: rank 0 has {show(signatures[0][name])}, "
                    f"rank {r} has {show(sig[name])}"
                )
    return signatures
