"""One ring step's attention calls: which rows of the local queries meet which rows of a key shard, and
how each call expresses the global position rules with the public attention function.

Positions are global: query ``p`` sees key ``t`` iff ``t <= p`` (causal), ``p - left <= t <= p + right``
(window, -1 unbounded); ALiBi adds ``-slope * |p - t|``. A shard is a list of segments of consecutive
positions (see :mod:`.layout`), so a (query segment, key segment) pair sees a band ``lo <= j - i <= hi``
of local offsets. Each call takes one of three forms:

- ``full``: every pair visible (no mask);
- ``band``: only an upper bound, ``j - i <= hi``: ``window_size=(-1, w)``, whose bottom-right alignment
  makes it exact for any lengths (causal of a shard against itself is ``w = 0``: positions increase
  within a shard, so causal order is local order);
- ``mask``: anything else (a window's lower edge crossing the block, or ALiBi, whose distances depend on
  global offsets the functional API has no argument for): an explicit ``(Lq, Lk)`` bool mask, or a float
  mask holding ``-slope * |p - t|`` and ``-inf`` where hidden. Only blocks that need it pay for it.

Without windows or ALiBi, a step's visible pairs merge into one call (a whole-shard causal call on the
diagonal step; one rectangle otherwise), which is what zig-zag's balanced steps need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..functional import scaled_dot_product_attention
from .layout import Segments

_INF = math.inf


@dataclass(frozen=True)
class Rules:
    """The call's options, shared by every block."""

    causal: bool
    window_left: int  # -1: unbounded
    window_right: int
    alibi: torch.Tensor | None  # canonical (1 or B, Hq) float32
    softcap: float  # 0: none
    scale: float
    enable_gqa: bool
    backend: str | None

    @property
    def plain(self) -> bool:
        """Visibility depends only on order (no distances): pairs of segments merge into one call."""
        return self.window_left < 0 and self.window_right < 0 and self.alibi is None

    def offset_bounds(self) -> tuple[float, float]:
        """Visible ``key position - query position`` range."""
        lo = -self.window_left if self.window_left >= 0 else -_INF
        hi = self.window_right if self.window_right >= 0 else _INF
        if self.causal:
            hi = min(hi, 0)
        return lo, hi


@dataclass(frozen=True)
class Block:
    """Rows ``q0:q1`` of the local queries against rows ``k0:k1`` of a key shard."""

    q0: int
    q1: int
    k0: int
    k1: int
    form: str  # "full", "band" or "mask"
    window_right: int = -1  # for "band"
    q_start: int = 0  # global position of row q0 / k0 ("mask" blocks span one segment each)
    k_start: int = 0


def _starts(segments: Segments) -> list[int]:
    starts, offset = [], 0
    for _, n in segments:
        starts.append(offset)
        offset += n
    return starts


def _pair(rules: Rules, q_seg: tuple[int, int], k_seg: tuple[int, int], q0: int, k0: int) -> Block | None:
    """The call for one query segment against one key segment, or None if nothing is visible."""
    (q_pos, len_q), (k_pos, len_k) = q_seg, k_seg
    lo, hi = rules.offset_bounds()
    dlo, dhi = lo - (k_pos - q_pos), hi - (k_pos - q_pos)  # bounds on local j - i
    if dhi < -(len_q - 1) or dlo > len_k - 1 or dlo > dhi:
        return None
    q1, k1 = q0 + len_q, k0 + len_k
    if rules.alibi is None and dlo <= -(len_q - 1):
        if dhi >= len_k - 1:
            return Block(q0, q1, k0, k1, "full")
        if dhi >= len_k - len_q:
            return Block(q0, q1, k0, k1, "band", window_right=int(dhi) - (len_k - len_q))
    return Block(q0, q1, k0, k1, "mask", q_start=q_pos, k_start=k_pos)


def plan_step(rules: Rules, q_segments: Segments, k_segments: Segments, same_shard: bool) -> list[Block]:
    """The calls of one ring step: the local queries against one key shard."""
    len_q = sum(n for _, n in q_segments)
    len_k = sum(n for _, n in k_segments)
    if rules.plain and not rules.causal:
        return [Block(0, len_q, 0, len_k, "full")]
    if rules.plain and same_shard:
        return [Block(0, len_q, 0, len_k, "band", window_right=0)]
    pairs = [
        block
        for q_seg, q0 in zip(q_segments, _starts(q_segments), strict=True)
        for k_seg, k0 in zip(k_segments, _starts(k_segments), strict=True)
        if (block := _pair(rules, q_seg, k_seg, q0, k0)) is not None
    ]
    if rules.plain and pairs and all(b.form == "full" for b in pairs):
        rect = Block(min(b.q0 for b in pairs), max(b.q1 for b in pairs), min(b.k0 for b in pairs),
                     max(b.k1 for b in pairs), "full")
        if sum((b.q1 - b.q0) * (b.k1 - b.k0) for b in pairs) == (rect.q1 - rect.q0) * (rect.k1 - rect.k0):
            return [rect]
    return pairs


def block_offsets(block: Block, device: torch.device) -> torch.Tensor:
    """``key position - query position`` over a ``mask`` block, ``(Lq, Lk)`` int64."""
    q_pos = torch.arange(block.q_start, block.q_start + block.q1 - block.q0, device=device)
    k_pos = torch.arange(block.k_start, block.k_start + block.k1 - block.k0, device=device)
    return k_pos[None, :] - q_pos[:, None]


def block_mask(rules: Rules, block: Block, device: torch.device, float_dtype: torch.dtype) -> torch.Tensor:
    """The ``mask`` form: bool ``(1, 1, Lq, Lk)``, or with ALiBi a float ``(1 or B, Hq, Lq, Lk)`` bias."""
    offset = block_offsets(block, device)
    lo, hi = rules.offset_bounds()
    visible = torch.ones_like(offset, dtype=torch.bool)
    if lo > -_INF:
        visible &= offset >= lo
    if hi < _INF:
        visible &= offset <= hi
    if rules.alibi is None:
        return visible[None, None]
    slopes = rules.alibi.to(float_dtype)[:, :, None, None]
    bias = -slopes * offset.abs().to(float_dtype)
    return bias.masked_fill(~visible, -_INF)


def call_attention(
    rules: Rules, block: Block, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the block's rows of ``q`` against the given keys (already cut to the block)."""
    kwargs: dict = {}
    if block.form == "band":
        kwargs["window_size"] = (-1, block.window_right)
    out, lse = scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=rules.scale, enable_gqa=rules.enable_gqa,
        softcap=rules.softcap or None, return_lse=True, backend=rules.backend, **kwargs,
    )
    return out, lse
