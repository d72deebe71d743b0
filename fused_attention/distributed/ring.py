"""Ring attention: each rank keeps its query shard while key/value shards travel around the ring.

Forward: at each of the ``P`` steps a rank posts the asynchronous send of the key/value shard it holds
(to the next rank) and the receive of the next one (from the previous rank), attends its queries to the
shard it holds (:mod:`.blocks`), merges the partial result through the lse (:mod:`.merge`), then waits
for the transfer; attention sinks join the merged result once, at the end. Backward: the key/value shards
go around again; each step's block gradients come from one backward call per block
(:mod:`.block_backward`, exact through the global softmax: given the global lse and delta where the
backend takes them, else from the global lse and each block's saved output); dQ stays local, and the dK/dV partial sums of a shard follow it one step behind, in float32
(float64 for float64 inputs), back to its owner.

Heads are independent, so the ring runs over one group of heads after another (:func:`head_groups`):
what a rank holds in flight is one group's.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ..ops.attention_rules import first_order_backward
from .block_backward import (
    block_backward,
    block_backward_from_stats,
    block_forward_for_stats,
    stats_backend,
    with_ones_column,
)
from .blocks import Rules, block_mask, call_attention, plan_step
from .layout import Segments
from .merge import accumulation_dtype, fold_sinks_, merge_into_
from .p2p import RingExchange
from .slope_grad import SlopeSums

# Test/benchmark hook: called as step_timer(phase, step, compute_seconds, wait_seconds) after each ring
# step ("forward" / "backward"); wait_seconds is the time spent waiting for that step's receives.
step_timer: Callable[[str, int, float, float], None] | None = None

_GRADS_TAG = 1  # dK/dV sums are in flight together with the next key/value shard (tag 0)


@dataclass(frozen=True)
class Ring:
    """Who holds what: the group, this rank, and every rank's segments of the sequence."""

    group: dist.ProcessGroup
    rank: int
    world: int
    segments: list[Segments]
    rules: Rules

    def source(self, step: int) -> int:
        """The rank whose key/value shard this rank holds at ``step``."""
        return (self.rank - step) % self.world

    def blocks(self, step: int):
        src = self.source(step)
        return plan_step(self.rules, self.segments[self.rank], self.segments[src], src == self.rank)

    def shard_shape(self, like: torch.Tensor, owner: int) -> torch.Size:
        return torch.Size((*like.shape[:2], sum(n for _, n in self.segments[owner]), like.shape[-1]))


def _report(phase: str, step: int, compute: float, wait: float) -> None:
    if step_timer is not None:
        step_timer(phase, step, compute, wait)


def _zero_sums(k: torch.Tensor, v: torch.Tensor, value_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero dK/dV sums for a key shard (``v`` may carry an extra ones column, which has no gradient)."""
    return k.new_zeros(k.shape, dtype=dtype), v.new_zeros(*v.shape[:-1], value_dim, dtype=dtype)


@dataclass(frozen=True)
class HeadGroup:
    """Query heads ``q`` and the key/value heads ``kv`` they attend to (GQA groups stay whole)."""

    q: slice
    kv: slice


def head_groups(q_heads: int, kv_heads: int, groups: int) -> list[HeadGroup]:
    """``groups`` (at most one per key/value head) near-equal groups of consecutive heads."""
    groups = max(1, min(groups, kv_heads))
    ratio = q_heads // max(kv_heads, 1)
    cuts = [kv_heads * i // groups for i in range(groups + 1)]
    return [HeadGroup(slice(a * ratio, b * ratio), slice(a, b)) for a, b in itertools.pairwise(cuts)]


def auto_head_groups(q: torch.Tensor, k: torch.Tensor) -> int:
    """How many head groups run their rings one after another (``head_groups=None``).

    Attention is independent across heads, so a ring over one group of heads at a time holds the
    buffers in flight (received key/value shards, dK/dV sums, a block's gradients) for that group only.
    On CPU a group keeps at least as many (batch, key/value head) pairs as threads (the unit the
    backward runs in parallel), so no thread idles: on one thread, a ring per key/value head. Elsewhere
    (CUDA) one group: a GPU kernel wants every head of the call to fill its SMs.
    """
    if q.device.type != "cpu":
        return 1
    per_group = -(-torch.get_num_threads() // max(q.shape[0], 1))
    return -(-k.shape[1] // per_group)


def _for_heads(ring: Ring, group: HeadGroup) -> Ring:
    rules = ring.rules
    if rules.alibi is not None:
        rules = replace(rules, alibi=rules.alibi[:, group.q])
    return replace(ring, rules=rules)


def _forward_ring(
    ring: Ring, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc_out: torch.Tensor, acc_lse: torch.Tensor,
    stats: bool, keep: bool,
) -> list:
    """One head group's forward ring, merged into ``acc_out``/``acc_lse`` (views) in place; returns each
    step's block ``(out, lse)`` when ``keep`` (for a backward that cannot take the global statistics).
    ``stats``: the blocks' backward takes the global statistics, and their forward gives a float64 lse."""
    k_cur, v_cur = k, v
    saved_blocks = []
    for step in range(ring.world):
        exchange = None
        if step < ring.world - 1:
            nxt = ring.source(step + 1)
            exchange = RingExchange(ring.group, [k_cur, v_cur], [ring.shard_shape(k, nxt), ring.shard_shape(v, nxt)])
        start = time.perf_counter()
        step_blocks = []
        for block in ring.blocks(step):
            if stats:
                out, lse = block_forward_for_stats(ring.rules, block, q, k_cur, v_cur)
            else:
                mask = block_mask(ring.rules, block, q.device, acc_out.dtype) if block.form == "mask" else None
                out, lse = call_attention(
                    ring.rules, block, q[:, :, block.q0 : block.q1], k_cur[:, :, block.k0 : block.k1],
                    v_cur[:, :, block.k0 : block.k1], mask,
                )
            merge_into_(acc_out[:, :, block.q0 : block.q1], acc_lse[:, :, block.q0 : block.q1], out, lse)
            if keep:
                step_blocks.append((out, lse))
        saved_blocks.append(step_blocks)
        compute = time.perf_counter() - start
        wait = 0.0
        if exchange is not None:
            (k_cur, v_cur), wait = exchange.wait()
        _report("forward", step, compute, wait)
    return saved_blocks


def _backward_ring(
    ring: Ring, stats: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
    lse: torch.Tensor, delta: torch.Tensor, dq: torch.Tensor, saved_blocks: list, slope_sums: SlopeSums | None,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """One head group's backward ring: adds into ``dq`` (a view); returns a call that gives this rank's
    dK and dV (in ``dq``'s dtype) once their partial sums have come around the ring (waiting for the
    last transfer then, not before the next group has started)."""
    cd = dq.dtype
    value_dim = v.shape[-1]
    k_cur, v_cur = (k, v) if stats else (k, with_ones_column(v))  # (the anchor method's ones column)
    grads_in: RingExchange | None = None
    for step in range(ring.world):
        exchange = None
        if step < ring.world - 1:
            nxt = ring.source(step + 1)
            exchange = RingExchange(
                ring.group, [k_cur, v_cur], [ring.shard_shape(k, nxt), ring.shard_shape(v_cur, nxt)]
            )
        start = time.perf_counter()
        step_saved, saved_blocks[step] = saved_blocks[step], None
        dk_step = dv_step = None
        for block in ring.blocks(step):
            if stats:
                dq_b, dk_b, dv_b = block_backward_from_stats(ring.rules, block, q, k_cur, v_cur, dout, lse, delta)
            else:
                block_out, block_lse = step_saved.pop(0)  # freed once used
                dq_b, dk_b, dv_b = block_backward(
                    ring.rules, block, q, k_cur, v_cur, dout, lse, delta, block_out, block_lse
                )
                del block_out, block_lse
            if slope_sums is not None and block.form == "mask":
                slope_sums.add(ring.rules, block, q, k_cur, v_cur[..., :value_dim], dout, lse)
            dq[:, :, block.q0 : block.q1] += dq_b
            if dk_step is None and block.k1 - block.k0 == k_cur.shape[2]:  # the whole shard: no copy
                dk_step, dv_step = dk_b.to(cd), dv_b.to(cd)
            else:
                if dk_step is None:
                    dk_step, dv_step = _zero_sums(k_cur, v_cur, value_dim, cd)
                dk_step[:, :, block.k0 : block.k1] += dk_b
                dv_step[:, :, block.k0 : block.k1] += dv_b
            del dq_b, dk_b, dv_b  # before the next block allocates its own
        if dk_step is None:  # nothing visible at this step: zero sums still travel on
            dk_step, dv_step = _zero_sums(k_cur, v_cur, value_dim, cd)
        compute = time.perf_counter() - start
        wait = 0.0
        if grads_in is not None:  # the partial sums of shard `src` from the ranks before this one
            (dk_in, dv_in), wait_grads = grads_in.wait()
            dk_step += dk_in
            dv_step += dv_in
            wait += wait_grads
            del dk_in, dv_in
        if ring.world > 1:
            # Forward the sums one step along; after the last step they reach the shard's owner.
            owner_next = ring.source(step + 1)
            grads_in = RingExchange(
                ring.group, [dk_step, dv_step],
                [ring.shard_shape(dk_step, owner_next), ring.shard_shape(dv_step, owner_next)], tag=_GRADS_TAG,
            )
        if exchange is not None:
            (k_cur, v_cur), wait_kv = exchange.wait()
            wait += wait_kv
        _report("backward", step, compute, wait)
    if grads_in is None:
        return lambda: (dk_step, dv_step)
    last = grads_in
    return lambda: tuple(last.wait()[0])


def _land(dk: torch.Tensor, dv: torch.Tensor, group: HeadGroup, home: Callable) -> None:
    """Copies a head group's dK/dV into the whole-head gradients once they are home."""
    dk_g, dv_g = home()
    dk[:, group.kv].copy_(dk_g)
    dv[:, group.kv].copy_(dv_g)


class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
        alibi: torch.Tensor | None, ring: Ring, groups: list[HeadGroup],
    ):
        cd = accumulation_dtype(q.dtype)
        # Block outputs are kept for the backward only where its blocks cannot take the global statistics;
        # where they can, the lse is merged (and kept for the backward) in float64.
        ctx.stats = stats_backend(ring.rules, q, k, v)
        keep = any(ctx.needs_input_grad[:5]) and not ctx.stats
        acc_out = q.new_zeros(*q.shape[:-1], v.shape[-1], dtype=cd)
        acc_lse = q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float64 if ctx.stats else cd)
        ctx.saved_blocks = [  # per head group, per step
            _forward_ring(
                _for_heads(ring, g), q[:, g.q], k[:, g.kv], v[:, g.kv], acc_out[:, g.q], acc_lse[:, g.q],
                ctx.stats, keep,
            )
            for g in groups
        ]
        if sinks is not None:
            fold_sinks_(acc_out, acc_lse, sinks.to(cd))
        out = acc_out.to(q.dtype)
        lse = acc_lse.to(cd)
        ctx.ring, ctx.groups = ring, groups
        ctx.save_for_backward(q, k, v, out, acc_lse, sinks)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @first_order_backward  # (its gradients have no derivative: a penalty through them raises)
    def backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor):
        ring: Ring = ctx.ring
        groups: list[HeadGroup] = ctx.groups
        saved_blocks, ctx.saved_blocks = ctx.saved_blocks, None
        if saved_blocks is None:  # (a TypeError deep in the loop before)
            raise RuntimeError(
                "ring_attention: its backward frees the key/value blocks the forward kept, as it goes (the whole "
                "sequence's keys and values otherwise stay until it ends), so it runs once per forward; a "
                "second backward through the same graph (retain_graph=True) needs the forward run again "
                "(ulysses_attention keeps what it saves)"
            )
        q, k, v, out, lse, sinks = ctx.saved_tensors
        cd = accumulation_dtype(q.dtype)
        delta = (dout.to(cd) * out.to(cd)).sum(-1)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            # This rank's rows: raising a sink scales each row's output by 1 - p_sink.
            p_sink = torch.exp(sinks.to(cd)[:, None] - torch.where(torch.isfinite(lse), lse, 0))
            dsinks = -(p_sink * delta).sum((0, 2)).to(sinks.dtype)
        alibi = ring.rules.alibi
        slope_sums = SlopeSums(q) if alibi is not None and ctx.needs_input_grad[4] else None
        dq = torch.zeros(q.shape, dtype=cd, device=q.device)
        if len(groups) > 1:  # each group's dK/dV land here once they are home
            dk, dv = torch.empty_like(k), torch.empty_like(v)
        # A group's sums are waited for after the next group's ring, so that no rank idles between groups
        # waiting for the slower one to finish (that would happen once per group, not once per call).
        previous = None
        for index, g in enumerate(groups):
            home = _backward_ring(
                _for_heads(ring, g), ctx.stats, q[:, g.q], k[:, g.kv], v[:, g.kv], dout[:, g.q], lse[:, g.q],
                delta[:, g.q], dq[:, g.q], saved_blocks[index], None if slope_sums is None else slope_sums.heads(g.q),
            )
            saved_blocks[index] = None
            if previous is not None:
                _land(dk, dv, *previous)
            previous = g, home
        if len(groups) == 1:
            dk, dv = previous[1]()
        else:
            _land(dk, dv, *previous)
        dslopes = None
        if slope_sums is not None:
            dslopes = slope_sums.gradient(lse, sinks)
            dslopes = dslopes.sum(0, keepdim=True) if alibi.shape[0] == 1 else dslopes
            dslopes = dslopes.to(alibi.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, dslopes, None, None
