"""Query-chunked attention in plain PyTorch: the math of the ``torch`` backend.

Forward and backward walk the queries in chunks so that no ``L x S`` matrix is ever held: peak extra
memory is ``O(B * H * chunk * S)``. Each chunk only touches the key columns its causal/window rules can
see, so a window of width ``w`` costs ``O(L * w)``. The backward recomputes scores from the saved
log-sum-exp (as FlashAttention does), and regenerates the dropout mask from the same per-chunk seeds.

All tensors are canonical (see :mod:`fused_attention.inputs`): q ``(B, Hq, L, E)``, k ``(B, Hkv, S, E)``,
v ``(B, Hkv, S, Ev)``, mask 4-D broadcastable, alibi ``(1 or B, Hq)``, key_lengths ``(B,)``, sinks ``(Hq,)``
(one more key per row with score ``sinks[h]`` and no value: it only joins the softmax denominator).
Arithmetic is float32 (float64 for float64 inputs). No autograd here: the custom op wires these up.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .layout import empty_gradient_of, empty_in_layout_of

# Elements of one (B, H, chunk, S) score block: a handful of these blocks is the working set.
_CHUNK_ELEMENTS = 1 << 19
_MIN_CHUNK = 16
_GOLDEN = 0x9E3779B97F4A7C15
_STREAM = 0xD1B54A32D192ED03
# log of the smallest normal number: exp below this is subnormal.
_UNDERFLOW = {torch.float32: -87.3, torch.float64: -708.3}


@dataclass(frozen=True)
class Rules:
    """Everything but the tensors: visibility, score transform and dropout."""

    causal: bool
    window_left: int
    window_right: int
    softcap: float
    scale: float
    dropout_p: float
    seed: int


def rules_from_op(causal, window_left, window_right, softcap, scale, dropout_p, seed, stream: int = 0) -> Rules:
    """Rules from custom-op arguments; ``seed`` is an int64 tensor (or None without dropout), and
    ``stream`` derives an independent dropout stream (one per packed sequence)."""
    base = int(seed.item()) if seed is not None else 0
    return Rules(causal, window_left, window_right, softcap, scale, dropout_p, (base + stream * _STREAM) % (1 << 63))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(batch: int, heads: int, seq_q: int, seq_k: int) -> int:
    """Query rows per chunk; depends on shapes only, so forward and backward chunk alike."""
    per_row = max(1, batch * heads * seq_k)
    return max(1, min(max(seq_q, 1), max(_MIN_CHUNK, _CHUNK_ELEMENTS // per_row)))


def key_range(i0: int, i1: int, seq_q: int, seq_k: int, rules: Rules) -> tuple[int, int]:
    """Half-open range of keys that any query row in ``[i0, i1)`` may see under the position rules."""
    shift = seq_k - seq_q  # query i sits at key position i + shift (bottom-right alignment)
    lo, hi = 0, seq_k
    if rules.causal:
        hi = min(hi, i1)
    if rules.window_right >= 0:
        hi = min(hi, i1 - 1 + shift + rules.window_right + 1)
    if rules.window_left >= 0:
        lo = max(lo, i0 + shift - rules.window_left)
    return max(lo, 0), max(min(hi, seq_k), 0)


class _Chunk:
    """Scores and probabilities of query rows ``[i0, i1)`` against keys ``[j0, j1)``."""

    def __init__(self, q, k, mask, key_lengths, alibi, rules: Rules, i0, i1, j0, j1):
        cd = self.cd = compute_dtype(q.dtype)
        batch, hq, seq_q, head_dim = q.shape
        hkv, seq_k = k.shape[1], k.shape[2]
        self.rows, self.cols, self.groups = i1 - i0, j1 - j0, hq // hkv
        self.q = q[:, :, i0:i1].to(cd).reshape(batch, hkv, self.groups * self.rows, head_dim)
        # Keys past a sequence's length are not part of it (FlashAttention's reading of varlen and KV-cache
        # lengths): their rows, which may hold anything (an uninitialized cache's NaN), are zeroed, or P = 0
        # times NaN made the output, dq and dk NaN (the cpu kernel never reads them).
        j = torch.arange(j0, j1, device=q.device).unsqueeze(0)
        self.padding = None if key_lengths is None else (j >= key_lengths.reshape(-1, 1, 1)).unsqueeze(-1)
        self.k = self.key_rows(k, j0, j1)
        # In-place updates throughout: the working set is a few (B, H, rows, cols) blocks, not dozens.
        scores = self._per_query_head(self.q @ self.k.transpose(-2, -1)).mul_(rules.scale)
        self.tanh = None
        if rules.softcap > 0:
            self.tanh = scores.div_(rules.softcap).tanh_()
            scores = self.tanh * rules.softcap
        i = torch.arange(i0, i1, device=q.device).unsqueeze(1)
        pos = i + seq_k - seq_q
        self.distance = None
        if alibi is not None:
            self.distance = (pos - j).abs().to(cd)
            scores.sub_(alibi.to(cd)[:, :, None, None] * self.distance)
        self.mask = None if mask is None else _mask_block(mask, i0, i1, j0, j1)
        if self.mask is not None and self.mask.dtype != torch.bool:
            scores.add_(self.mask.to(cd))
        visible = None
        if not _block_fully_visible(i0, i1, j0, j1, seq_q, seq_k, rules):
            visible = torch.ones_like(pos.expand(-1, self.cols), dtype=torch.bool)
            if rules.causal:
                visible &= j <= i
            if rules.window_left >= 0:
                visible &= j >= pos - rules.window_left
            if rules.window_right >= 0:
                visible &= j <= pos + rules.window_right
        if key_lengths is not None:
            lengths = j < key_lengths.reshape(-1, 1, 1, 1)
            visible = lengths if visible is None else visible & lengths
        if self.mask is not None and self.mask.dtype == torch.bool:
            visible = self.mask if visible is None else visible & self.mask
        self.scores = scores if visible is None else scores.masked_fill_(~visible, float("-inf"))
        self.keep = None
        if rules.dropout_p > 0:
            gen = torch.Generator(device=q.device)
            gen.manual_seed((rules.seed + i0 * _GOLDEN) % (1 << 63))
            rand = torch.rand(self.scores.shape, generator=gen, device=q.device, dtype=cd)
            keep_scale = 1.0 / (1.0 - rules.dropout_p) if rules.dropout_p < 1 else 0.0  # (p = 1: all dropped)
            self.keep = (rand >= rules.dropout_p).to(cd) * keep_scale

    def key_rows(self, x: torch.Tensor, j0: int, j1: int) -> torch.Tensor:
        """Rows ``[j0, j1)`` of keys or values ``(B, Hkv, S, E)`` in the compute dtype, those past the key
        lengths zeroed."""
        rows = x[:, :, j0:j1].to(self.cd)
        return rows if self.padding is None else rows.masked_fill(self.padding, 0)

    def _per_query_head(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, G * rows, X)`` -> ``(B, Hq, rows, X)``; query head h = kv head * G + g."""
        b, hkv = t.shape[:2]
        return t.reshape(b, hkv * self.groups, self.rows, t.shape[-1])

    def per_kv_head(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, Hq, rows, X)`` -> ``(B, Hkv, G * rows, X)``, the inverse of :meth:`_per_query_head`."""
        b, hq = t.shape[:2]
        return t.reshape(b, hq // self.groups, self.groups * self.rows, t.shape[-1])

    def take_softmax(
        self, sinks: torch.Tensor | None = None, precise_lse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs, lse)`` of the scores, in place (one exp per score); empty rows give 0 and -inf.

        With ``sinks`` the denominator gains ``exp(sinks[h])`` (lse includes it; an empty row's lse is
        the sink) and ``self.sink_probs`` ``(B, Hq, rows, 1)`` keeps the sink's probability.
        ``precise_lse``: lse in float64 from the row's sum taken in float64 (the precision of the sum,
        not of the compute dtype's spacing at ``|lse|``)."""
        row_max = self.scores.amax(dim=-1, keepdim=True)
        sink = None
        if sinks is not None:
            sink = sinks.to(row_max.dtype).reshape(1, -1, 1, 1)
            row_max = torch.maximum(row_max, sink)
        row_max.masked_fill_(row_max == float("-inf"), 0.0)
        probs, self.scores = _exp_(self.scores.sub_(row_max)), None
        total = probs.sum(dim=-1, keepdim=True)
        if sink is not None:
            self.sink_probs = _exp_(sink - row_max)
            total.add_(self.sink_probs)
        total_safe = total.clamp(min=torch.finfo(probs.dtype).tiny)
        lse = (row_max + total.log()).squeeze(-1)
        if precise_lse:
            lse = (row_max.double() + probs.sum(dim=-1, keepdim=True, dtype=torch.float64).log()).squeeze(-1)
        probs.div_(total_safe)
        if sink is not None:
            self.sink_probs.div_(total_safe)
        return probs, lse


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """In-place exp of ``x <= 0``, flushing results below the smallest normal number to 0.

    Subnormal results make exp (and everything after it) many times slower on x86, and ALiBi or long
    windows push most scores there; what is flushed is below 1.2e-38 (float32), far under any tolerance.
    """
    limit = _UNDERFLOW[x.dtype]
    # One cheap reduction saves two passes where nothing underflows (blocks with no masked entry).
    if x.numel() and x.amin() < limit:
        x.masked_fill_(x < limit, float("-inf"))
    return x.exp_()


def _block_fully_visible(i0: int, i1: int, j0: int, j1: int, seq_q: int, seq_k: int, rules: Rules) -> bool:
    """Whether the position rules (causal, window) hide nothing in rows [i0, i1) x keys [j0, j1).

    A row's visible keys form an interval whose both ends grow with the row, so checking the first
    row's upper end and the last row's lower end suffices."""
    shift = seq_k - seq_q
    if rules.causal and j1 - 1 > i0:
        return False
    if rules.window_right >= 0 and j1 - 1 > i0 + shift + rules.window_right:
        return False
    return not (rules.window_left >= 0 and j0 < i1 - 1 + shift - rules.window_left)


def _mask_block(mask: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
    rows = slice(i0, i1) if mask.shape[2] != 1 else slice(None)
    cols = slice(j0, j1) if mask.shape[3] != 1 else slice(None)
    return mask[:, :, rows, cols]


# Test hook: called with (i0, i1, j0, j1) for every block the math visits, to prove tile skipping.
visit_hook = None


def _chunks(q: torch.Tensor, k: torch.Tensor, rules: Rules):
    batch, hq, seq_q, _ = q.shape
    seq_k = k.shape[2]
    if hq == 0 or k.shape[1] == 0:
        return  # no head pairs: nothing to compute (and no group size to divide by)
    step = chunk_rows(batch, hq, seq_q, seq_k)
    for i0 in range(0, seq_q, step):
        i1 = min(i0 + step, seq_q)
        block = (i0, i1, *key_range(i0, i1, seq_q, seq_k, rules))
        if visit_hook is not None and block[2] < block[3]:
            visit_hook(*block)
        yield block


def _no_autocast(fn):
    """The math picks its own precision: an enclosing autocast must not recast its matmuls."""

    @functools.wraps(fn)
    def wrapper(first: torch.Tensor, *args, **kwargs):
        device_type = first.device.type
        if not torch.amp.is_autocast_available(device_type):
            return fn(first, *args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return fn(first, *args, **kwargs)

    return wrapper


@_no_autocast
def attention_forward(
    q, k, v, mask, key_lengths, alibi, rules: Rules, sinks=None, precise_lse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out (B, Hq, L, Ev)`` in q's dtype and ``lse (B, Hq, L)`` in the compute dtype (float64
    with ``precise_lse``: see :meth:`_Chunk.take_softmax`)."""
    batch, hq, seq_q, _ = q.shape
    cd = compute_dtype(q.dtype)
    out = empty_in_layout_of(q, v.shape[-1]).zero_()
    lse = q.new_full((batch, hq, seq_q), float("-inf"), dtype=torch.float64 if precise_lse else cd)
    if sinks is not None:  # rows that see no key: the denominator is the sink alone
        lse.copy_(sinks.to(cd)[None, :, None].expand(lse.shape))
    for i0, i1, j0, j1 in _chunks(q, k, rules):
        if j0 >= j1:
            continue  # nothing visible: out stays 0 and lse -inf (the sink with sinks)
        c = _Chunk(q, k, mask, key_lengths, alibi, rules, i0, i1, j0, j1)
        p, chunk_lse = c.take_softmax(sinks, precise_lse)
        if c.keep is not None:
            p.mul_(c.keep)
        o = c.per_kv_head(p) @ c.key_rows(v, j0, j1)
        out[:, :, i0:i1] = o.reshape(batch, hq, i1 - i0, v.shape[-1])
        lse[:, :, i0:i1] = chunk_lse
    return out, lse


def _reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dims where ``shape`` broadcasts (size 1)."""
    dims = tuple(d for d, n in enumerate(shape) if n == 1 and t.shape[d] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _slope_grad_terms(ds: torch.Tensor, p: torch.Tensor, distance: torch.Tensor, sinks: bool) -> torch.Tensor:
    """``sum over rows and keys of dS * |distance|`` per (batch, head), minus which is the slope gradient.
    Without sinks, summed against distances centered on each row's mean distance under P: the same sum (a
    row's dS sums to 0), but the rounding a row's dS carries nearly in proportion to its P is no longer
    multiplied by distances of up to the key range: the plain sum failed DESIGN.md's policy on 5 of 200
    random slope draws (float32, tests/test_varlen.py's case), centered none (the cpu and triton backends
    center too). With sinks (a row's dS sums to p_sink * delta) the plain sum stays: centered, 3 of 30 seeds
    of tests/test_sinks.py's ALiBi case failed, plain none (the error there is in dS itself: summed in
    float64 it failed as well)."""
    if sinks:
        return (ds * distance).sum((-2, -1))
    mass = p.sum(-1, keepdim=True)  # 1; 0 for a row that sees no key
    center = (p * distance).sum(-1, keepdim=True) / mass.clamp(min=torch.finfo(p.dtype).tiny)
    return (ds * (distance - center)).sum((-2, -1))


def _add_score_grads(c: _Chunk, ds: torch.Tensor, rules: Rules, dq, dk, i0: int, i1: int, j0: int, j1: int) -> None:
    """dq and dk of the chunk from ``ds``, the gradient of its final scores ``(B, Hq, rows, cols)``: back
    through softcap and the scale, into the query rows ``[i0, i1)`` and (added) the keys ``[j0, j1)``."""
    if c.tanh is not None:
        ds.mul_(1 - c.tanh * c.tanh)
    ds = c.per_kv_head(ds.mul_(rules.scale))
    dq[:, :, i0:i1] = (ds @ c.k).reshape(*dq.shape[:2], i1 - i0, dq.shape[-1])
    dk[:, :, j0:j1] += ds.transpose(-2, -1) @ c.q


@_no_autocast
def attention_backward(
    dout, q, k, v, mask, key_lengths, alibi, rules: Rules, need_mask_grad: bool, need_alibi_grad: bool,
    sinks=None, need_sinks_grad: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Gradients ``(dq, dk, dv, dmask, dalibi, dsinks)``; dmask/dalibi/dsinks are None unless asked for.

    A sink's gradient is ``-sum over batch and rows of p_sink * delta`` (``delta = rowsum(dout * out)``):
    raising the sink scales the row's output by ``1 - p_sink``."""
    cd = compute_dtype(q.dtype)
    dq, dk, dv = (empty_gradient_of(t, cd).zero_() for t in (q, k, v))
    dmask = torch.zeros(mask.shape, dtype=cd, device=q.device) if need_mask_grad else None
    dalibi = torch.zeros(alibi.shape, dtype=cd, device=q.device) if need_alibi_grad else None
    dsinks = torch.zeros(sinks.shape, dtype=cd, device=q.device) if need_sinks_grad else None
    for i0, i1, j0, j1 in _chunks(q, k, rules):
        if j0 >= j1:
            continue  # out is 0 there, so delta and every gradient (the sink's too) vanish
        c = _Chunk(q, k, mask, key_lengths, alibi, rules, i0, i1, j0, j1)
        # Recompute the softmax of the whole row (the chunk holds every key the row can see) rather than
        # exp(s - lse): its error does not grow with |lse|, as in torch's own softmax backward.
        p, _ = c.take_softmax(sinks)
        do = c.per_kv_head(dout[:, :, i0:i1].to(cd))
        vs = c.key_rows(v, j0, j1)
        p_kept = p if c.keep is None else p * c.keep
        dv[:, :, j0:j1] += c.per_kv_head(p_kept).transpose(-2, -1) @ do
        dp = (do @ vs.transpose(-2, -1)).reshape(p.shape)
        # delta = rowsum(dout * out) in exact arithmetic; summing p * dp over the row (which the chunk
        # holds whole) is what the softmax backward rounds, so gradients that vanish exactly stay 0.
        delta = (p_kept * dp).sum(-1, keepdim=True)
        if dsinks is not None:
            dsinks -= (c.sink_probs * delta).sum((0, 2, 3))
        if c.keep is not None:
            dp.mul_(c.keep)
        ds = dp.sub_(delta).mul_(p)  # gradient of the final (biased) score
        if dmask is not None:
            rows = slice(i0, i1) if mask.shape[2] != 1 else slice(None)
            cols = slice(j0, j1) if mask.shape[3] != 1 else slice(None)
            dmask[:, :, rows, cols] += _reduce_to(ds, mask.shape)
        if dalibi is not None:
            dalibi -= _reduce_to(_slope_grad_terms(ds, p, c.distance, sinks is not None), alibi.shape)
        _add_score_grads(c, ds, rules, dq, dk, i0, i1, j0, j1)
    return (
        dq.to(q.dtype),
        dk.to(k.dtype),
        dv.to(v.dtype),
        None if dmask is None else dmask.to(mask.dtype),
        None if dalibi is None else dalibi.to(alibi.dtype),
        None if dsinks is None else dsinks.to(sinks.dtype),
    )


@_no_autocast
def attention_backward_from_stats(
    dout, q, k, v, mask, key_lengths, alibi, rules: Rules, lse, delta
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of a block of a larger softmax, FlashAttention's way: each row's ``lse`` and
    ``delta = rowsum(dO * O)`` ``(B, Hq, L)`` of the whole softmax are given, ``P = exp(S - lse)`` and
    ``dS = P (dP - delta)`` (ring attention's blocks). A float64 ``lse`` with a lower compute dtype
    (:func:`attention_forward`'s precise one) is taken as its nearest value in that dtype and the rest
    as a per-row factor. No dropout, no sinks (they belong to the whole softmax: its caller's)."""
    cd = compute_dtype(q.dtype)
    hi = lse.to(cd)
    hi = hi.masked_fill(hi == float("-inf"), 0.0)  # a row that sees no key anywhere: every score is -inf
    low = None
    if lse.dtype == torch.float64 and cd != torch.float64:
        low = torch.where(torch.isfinite(lse), lse - hi.double(), 0.0).to(cd)
    dq, dk, dv = (empty_gradient_of(t, cd).zero_() for t in (q, k, v))
    for i0, i1, j0, j1 in _chunks(q, k, rules):
        if j0 >= j1:
            continue
        c = _Chunk(q, k, mask, key_lengths, alibi, rules, i0, i1, j0, j1)
        p, c.scores = c.scores.sub_(hi[:, :, i0:i1, None]).exp_(), None
        if low is not None:
            p.mul_(torch.exp(-low[:, :, i0:i1, None]))
        do = c.per_kv_head(dout[:, :, i0:i1].to(cd))
        dv[:, :, j0:j1] += c.per_kv_head(p).transpose(-2, -1) @ do
        dp = (do @ c.key_rows(v, j0, j1).transpose(-2, -1)).reshape(p.shape)
        ds = dp.sub_(delta[:, :, i0:i1, None].to(cd)).mul_(p)
        _add_score_grads(c, ds, rules, dq, dk, i0, i1, j0, j1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
