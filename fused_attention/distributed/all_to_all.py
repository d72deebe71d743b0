"""Ulysses' re-sharding: sequence-sharded ``(B, H, L/P, D)`` <-> head-sharded ``(B, H/P, L, D)``.

One ``all_to_all_single`` each way (uneven shard lengths go as split sizes). Differentiable: the
gradient of an all-to-all is the all-to-all back. Gloo implements ``all_to_all_single`` with split
sizes (alltoall/alltoallv, since torch 1.7: pytorch/pytorch#41424) but not the list form
``all_to_all`` (pytorch/pytorch#88245), so only the single-tensor form is used; checked on gloo with
torch 2.14, and the package needs torch >= 2.6 anyway.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import Segments, positions


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat: torch.Tensor, send: list[int], recv: list[int], pg: dist.ProcessGroup):
        ctx.send, ctx.recv, ctx.pg = send, recv, pg
        out = flat.new_empty(sum(recv))
        dist.all_to_all_single(out, flat.contiguous(), recv, send, group=pg)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty(sum(ctx.send))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.pg)
        return back, None, None, None


class Resharder:
    """Moves tensors between the sequence-sharded and head-sharded forms for one group and layout."""

    def __init__(self, pg: dist.ProcessGroup, segments: list[Segments], device: torch.device) -> None:
        self.pg = pg
        self.world = dist.get_world_size(pg)
        self.lengths = [sum(n for _, n in shard) for shard in segments]
        self.rank = dist.get_rank(pg)
        concat = torch.cat([positions(shard, device) for shard in segments])
        ordered = bool((concat[1:] > concat[:-1]).all()) if concat.numel() > 1 else True
        # Rows arrive in rank order (each rank's shard in its local order); these put them in
        # global order and back (None: rank order is already global order, as for "contiguous").
        self.to_global = None if ordered else torch.argsort(concat)
        self.to_shards = None if ordered else concat

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, L_rank, F)`` shard -> ``(B, H/P, L, F)``: this rank's head group, whole sequence."""
        b, h, n, f = x.shape
        hp = h // self.world
        send = x.reshape(b, self.world, hp, n, f).transpose(0, 1).reshape(-1)
        recv_sizes = [b * hp * length * f for length in self.lengths]
        received = _AllToAll.apply(send, [b * hp * n * f] * self.world, recv_sizes, self.pg)
        pieces = [p.reshape(b, hp, length, f) for p, length in zip(received.split(recv_sizes), self.lengths, strict=True)]
        whole = torch.cat(pieces, dim=2)
        return whole if self.to_global is None else whole.index_select(2, self.to_global)

    def to_sequence(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, H/P, L, F)`` -> ``(B, H, L_rank, F)``: the inverse of :meth:`to_heads`."""
        b, hp, _, f = y.shape
        if self.to_shards is not None:
            y = y.index_select(2, self.to_shards)
        send = torch.cat([p.reshape(-1) for p in y.split(self.lengths, dim=2)])
        n = self.lengths[self.rank]
        send_sizes = [b * hp * length * f for length in self.lengths]
        received = _AllToAll.apply(send, send_sizes, [b * hp * n * f] * self.world, self.pg)
        return received.reshape(self.world, b, hp, n, f).transpose(0, 1).reshape(b, self.world * hp, n, f)
