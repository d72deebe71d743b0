"""Point-to-point exchange around a ring: post sends and receives, compute, then wait.

``batch_isend_irecv`` returns one work per operation on gloo (one for the whole batch on NCCL); waiting
only on the first would return before the other transfers finish, so :meth:`RingExchange.wait` waits on
every one. Receive buffers are fresh tensors, so what is being sent is never overwritten. Transfers of
different kinds that may be in flight together (keys/values, gradient sums) use different tags (gloo
matches by tag; NCCL orders them by issue order, which every rank shares).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class RingExchange:
    """Sends ``tensors`` to the next rank and receives same-shaped tensors from the previous one."""

    def __init__(
        self, pg: dist.ProcessGroup, tensors: list[torch.Tensor], recv_shapes: list[torch.Size] | None = None,
        tag: int = 0,
    ) -> None:
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        nxt = dist.get_global_rank(pg, (rank + 1) % world)
        prev = dist.get_global_rank(pg, (rank - 1) % world)
        shapes = recv_shapes or [t.shape for t in tensors]
        self.received = [t.new_empty(shape) for t, shape in zip(tensors, shapes, strict=True)]
        self.sent = [t.contiguous() for t in tensors]  # kept alive until the sends complete
        ops = [dist.P2POp(dist.isend, t, nxt, group=pg, tag=tag) for t in self.sent]
        ops += [dist.P2POp(dist.irecv, buf, prev, group=pg, tag=tag) for buf in self.received]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> tuple[list[torch.Tensor], float]:
        """The received tensors, and the seconds spent waiting for them."""
        start = time.perf_counter()
        for work in self.works:
            work.wait()
        return self.received, time.perf_counter() - start
