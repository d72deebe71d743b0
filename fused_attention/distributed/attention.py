"""Public context-parallel attention: :func:`ring_attention` and :func:`ulysses_attention`."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..argument_checks import check_bool
from ..backends.dispatch import BACKENDS, forced_backend_name, get_backend
from ..errors import AttentionArgumentError
from ..functional import _autocast, scaled_dot_product_attention
from ..inputs import canonicalize
from .all_to_all import Resharder
from .block_backward import stats_backend
from .blocks import Rules
from .groups import resolve_group
from .layout import LAYOUTS, check_divisible, check_layout, shard_segments
from .ring import Ring, RingAttentionFunction, auto_head_groups
from .ring import head_groups as split_heads
from .validate import exchange_signatures

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FIELDS = (
    "batch", "query heads", "key/value heads", "shard length", "head dim", "value head dim", "dtype",
    "is_causal", "window left", "window right", "alibi_slopes", "alibi_slopes values", "softcap", "scale",
    "layout", "enable_gqa", "requires grad", "sinks", "sinks values", "head groups", "backend",
    "block backward from statistics",
)
# "backend": -1 automatic, else the index of the forced backend (an unknown name raises on its rank).
_BACKEND_NAMES = tuple(BACKENDS)


def _flag(value: float) -> str:
    return str(bool(value))


# how a mismatch message writes the fields that travel as numbers standing for names or flags
_SHOWN = {
    "dtype": lambda i: str(_DTYPES[int(i)]), "layout": lambda i: repr(LAYOUTS[int(i)]),
    "backend": lambda i: "automatic" if i < 0 else repr(_BACKEND_NAMES[int(i)]),
    "is_causal": _flag, "alibi_slopes": _flag, "enable_gqa": _flag, "requires grad": _flag, "sinks": _flag,
    "block backward from statistics": _flag,
}


def _fingerprint(t: torch.Tensor | None) -> float:
    """A number two ranks' tensors share only when equal, as far as one float can tell: the values weighted
    by their positions (a plain sum missed permuted slopes or sinks)."""
    if t is None:
        return 0.0
    values = t.detach().double().flatten()
    weights = torch.arange(1, values.numel() + 1, dtype=torch.float64, device=values.device).sqrt()
    return float((values * weights).sum() + values.sum())


def rules_of(inputs: Any, enable_gqa: Any, backend: Any) -> Rules:
    return Rules(
        causal=inputs.causal, window_left=inputs.window_left, window_right=inputs.window_right,
        alibi=inputs.alibi_slopes, softcap=inputs.softcap, scale=inputs.scale, enable_gqa=bool(enable_gqa),
        backend=backend,
    )


def _prepare(
    what: str, query: Any, key: Any, value: Any, group: Any, is_causal: Any, scale: Any, enable_gqa: Any,
    window_size: Any, alibi_slopes: Any, softcap: Any, layout: Any, sinks: Any, return_lse: Any, backend: Any,
    head_groups: Any = 1,
) -> tuple[dist.ProcessGroup, Rules, list, str, int]:
    """Checks the arguments on this rank and collectively; returns the group, rules, segments, layout and
    the number of head groups (the fewest any rank asks for: an automatic choice may differ by rank)."""
    pg = resolve_group(group)
    world = dist.get_world_size(pg)
    canonical = {}

    def local() -> dict[str, float]:
        lay = check_layout(layout)
        inputs = canonicalize(
            query, key, value, None, 0.0, is_causal, scale, enable_gqa, window_size=window_size,
            alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks,
        )
        check_bool("return_lse", return_lse)
        forced = forced_backend_name(backend)
        if forced is not None:
            get_backend(forced)  # an unknown name raises here, before any transfer
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 4:
                raise AttentionArgumentError(f"{name} must be (batch, heads, seq shard, head_dim), got {t.dim()}-D")
        if not query.shape[0] == key.shape[0] == value.shape[0] or key.shape[:3] != value.shape[:3]:
            raise AttentionArgumentError(
                f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} must share "
                "batch, and key/value their heads and length (no broadcasting under context parallelism)"
            )
        if key.shape[2] != query.shape[2]:
            raise AttentionArgumentError(
                f"key shard length {key.shape[2]} must equal the query shard length {query.shape[2]} "
                "(context parallelism shards one sequence of queries, keys and values alike)"
            )
        if key.shape[1] != query.shape[1] and not enable_gqa:
            raise AttentionArgumentError(
                f"key heads ({key.shape[1]}) differ from query heads ({query.shape[1]}): pass enable_gqa=True"
            )
        canonical["inputs"] = inputs
        groups = head_groups
        if groups is None:
            groups = auto_head_groups(query, key)
        elif isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise AttentionArgumentError(f"head_groups must be a positive int or None, got {head_groups!r}")
        alibi = inputs.alibi_slopes
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (query, key, value, inputs.sinks, inputs.alibi_slopes)
        )
        return {
            "batch": query.shape[0], "query heads": query.shape[1], "key/value heads": key.shape[1],
            "shard length": query.shape[2], "head dim": query.shape[3], "value head dim": value.shape[3],
            "dtype": _DTYPES.index(query.dtype), "is_causal": inputs.causal,
            "window left": inputs.window_left, "window right": inputs.window_right,
            "alibi_slopes": alibi is not None,
            "alibi_slopes values": _fingerprint(alibi),
            "softcap": inputs.softcap, "scale": inputs.scale, "layout": LAYOUTS.index(lay),
            "enable_gqa": bool(enable_gqa), "requires grad": grad, "sinks": inputs.sinks is not None,
            "sinks values": _fingerprint(inputs.sinks),
            "head groups": min(groups, key.shape[1]),
            "backend": -1 if forced is None else _BACKEND_NAMES.index(forced),
            # what travels around the ring (values with or without a ones column) depends on it
            "block backward from statistics": stats_backend(rules_of(inputs, enable_gqa, backend), query, key, value),
        }

    lay = layout if layout in LAYOUTS else "contiguous"
    may_differ = frozenset({"shard length", "head groups"} if lay == "contiguous" else {"head groups"})
    signatures = exchange_signatures(pg, what, _FIELDS, local, may_differ, _SHOWN)
    lengths = [int(s["shard length"]) for s in signatures]
    check_divisible(lay, sum(lengths), world)
    rules = rules_of(canonical["inputs"], enable_gqa, backend)
    return pg, rules, shard_segments(lay, lengths), lay, int(min(s["head groups"] for s in signatures))


_SHARED_DOC = """
    Every rank of ``group`` calls it at the same time with its shard of one sequence (see
    :func:`shard_sequence`); shapes, dtype and options must agree across ranks, ``head_groups`` aside
    (checked collectively: a bad argument on any rank raises on every rank, never hangs).

    Args:
        query: ``(B, Hq, L_shard, E)``: this rank's shard of the queries, in ``layout`` order.
        key: ``(B, Hkv, L_shard, E)``; the same positions as ``query`` (self-attention over one sequence).
        value: ``(B, Hkv, L_shard, Ev)``.
        group: a ``ProcessGroup``, a 1-D ``DeviceMesh``, or None for the default group. Gloo with CPU
            tensors, NCCL with CUDA tensors.
        is_causal: causal mask over global positions (query ``p`` sees keys ``t <= p``).
        scale: score scale; default ``1 / sqrt(E)``.
        enable_gqa: grouped-query attention (``Hq`` a multiple of ``Hkv``).
        window_size: ``(left, right)`` over global positions: key ``t`` is visible from query ``p`` iff
            ``p - left <= t <= p + right`` (-1: unbounded), as in
            :func:`fused_attention.scaled_dot_product_attention` on the whole sequence (``L == S``).
        alibi_slopes: float32 ``(Hq,)`` or ``(B, Hq)``; adds ``-slope * |p - t|`` with global positions.
            Differentiable; the gradient on each rank is its share, as for ``sinks``.
        softcap: ``score = softcap * tanh(score / softcap)``.
        sinks: learned attention sinks, float32 (or float64) ``(Hq,)``, the same on every rank: each
            row's softmax over the whole sequence gains one more "key" with score ``sinks[h]`` and no
            value, as in :func:`fused_attention.scaled_dot_product_attention`. Differentiable; like any
            parameter replicated across the group, each rank's gradient is its share (its rows' in the
            ring, its heads' in Ulysses), and the sum over ranks (the all-reduce that DDP / FSDP run over the context-parallel ranks) is the
            whole sequence's gradient.
        layout: ``"zigzag"`` (chunks ``r`` and ``2P - 1 - r`` of ``2P`` equal chunks; the sequence length
            must be divisible by ``2P``) or ``"contiguous"`` (consecutive pieces; any lengths, one per
            rank, uneven allowed).
        return_lse: also return the log-sum-exp ``(B, Hq, L_shard)``, float32 (float64 for float64),
            including the sink's term with ``sinks``.
        backend: force one of our backends for the per-rank attention calls (as in
            :func:`fused_attention.scaled_dot_product_attention`).

    Not supported under context parallelism: ``attn_mask``, ``key_lengths``, dropout. Every rank must run the backward (it is collective) when inputs require grad.

    Returns:
        ``out (B, Hq, L_shard, Ev)`` in the query dtype, this rank's shard of the attention output over
        the whole sequence; with ``return_lse=True``, ``(out, lse)``.
"""


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group: Any = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    layout: str = "zigzag",
    return_lse: bool = False,
    backend: str | None = None,
    head_groups: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Ring attention over a sequence sharded across ranks: equals attention on the whole sequence.

    Each rank keeps its queries; key/value shards travel around the ring with asynchronous
    point-to-point transfers posted before each step's compute, so communication overlaps compute.
    Partial results merge through their log-sum-exp in float32 (float64 for float64 inputs). The
    backward sends the key/value shards around again and the dK/dV partial sums around a second ring
    (float32 / float64); sinks join the merged result once. Each step's attention runs on our kernels
    through our kernels; each block's backward is one call of its backend's backward, made exact through
    the global softmax: given the global lse and delta where the backend takes them (``cpu``: the
    blocks' lse in float64 then), else from the global lse and the block's saved output
    (``fused_attention/distributed/block_backward.py``). Per-rank memory: the O(L / P) shards, plus,
    where the blocks' outputs are kept for the backward, one output-sized tensor per ring step, i.e.
    ``(B, Hq, L, Ev)`` in all. Under ``torch.autocast`` the inputs are cast as
    :func:`fused_attention.scaled_dot_product_attention` casts them.
    With ``layout="zigzag"`` and ``is_causal=True`` every rank does the same work at every step.

    ``head_groups``: run the ring over this many groups of heads, one group after another (a key/value
    head and its query heads stay together; at most one group per key/value head). Attention is
    independent across heads, so the buffers in flight (received key/value shards, dK/dV sums, a
    block's gradients) are one group's (and the previous group's dK/dV sums until they land): per-rank
    memory falls towards the shards and their gradients, for more (smaller) transfers and calls. ``None`` (default): on CPU, as many groups as leave each call at
    least one (batch, key/value head) pair per thread (a ring per key/value head on one thread); on CUDA
    one group, so that each kernel sees every head. Ranks run the fewest groups any of them asks for.
    """
    query, key, value = _autocast(query, key, value)  # as scaled_dot_product_attention: the autocast dtype
    pg, rules, segments, _, groups = _prepare(
        "ring_attention", query, key, value, group, is_causal, scale, enable_gqa, window_size, alibi_slopes,
        softcap, layout, sinks, return_lse, backend, head_groups,
    )
    ring = Ring(pg, dist.get_rank(pg), dist.get_world_size(pg), segments, rules)
    heads = split_heads(query.shape[1], key.shape[1], groups)
    out, lse = RingAttentionFunction.apply(query, key, value, sinks, rules.alibi, ring, heads)
    return (out, lse) if return_lse else out


def ulysses_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group: Any = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    layout: str = "contiguous",
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Ulysses (DeepSpeed) sequence parallelism: all-to-all from sequence shards to head shards.

    One all-to-all gives each rank ``H / P`` heads of the whole sequence; our attention runs on them
    (every option works as on one device, positions are already global), and one all-to-all returns
    the output to sequence shards. Query heads and key/value heads must both be divisible by the group
    size (else a clear error; use :func:`ring_attention`). Per-rank activation memory is O(L / P), but
    each rank holds whole-sequence K/V for its heads during the call.
    """
    pg, rules, segments, _, _ = _prepare(
        "ulysses_attention", query, key, value, group, is_causal, scale, enable_gqa, window_size, alibi_slopes,
        softcap, layout, sinks, return_lse, backend,
    )
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    for name, heads in (("query", query.shape[1]), ("key/value", key.shape[1])):
        if heads % world:
            raise AttentionArgumentError(
                f"ulysses_attention: {name} heads ({heads}) must be divisible by the group size ({world}); "
                "use ring_attention"
            )
    heads = query.shape[1] // world
    own = slice(rank * heads, (rank + 1) * heads)  # this rank's query heads after the all-to-all
    alibi = None if rules.alibi is None else rules.alibi[:, own]
    if alibi is not None and alibi.shape[0] == 1:  # canonical (1, Hq): shared by the batch, any batch size
        alibi = alibi[0]
    reshard = Resharder(pg, segments, query.device)
    out, lse = scaled_dot_product_attention(
        reshard.to_heads(query), reshard.to_heads(key), reshard.to_heads(value), is_causal=rules.causal,
        scale=rules.scale, enable_gqa=enable_gqa, window_size=(rules.window_left, rules.window_right),
        alibi_slopes=alibi, softcap=rules.softcap or None, return_lse=True,
        sinks=None if sinks is None else sinks[own], backend=backend,
    )
    out = reshard.to_sequence(out)
    if not return_lse:
        return out
    with torch.no_grad():
        lse = reshard.to_sequence(lse.unsqueeze(-1)).squeeze(-1)
    return out, lse


ring_attention.__doc__ = (ring_attention.__doc__ or "") + _SHARED_DOC
ulysses_attention.__doc__ = (ulysses_attention.__doc__ or "") + _SHARED_DOC
