"""Tile-level pieces shared by the Triton attention kernels (forward, dK/dV and dQ passes).

Every helper takes the query index ``i`` and key index ``j`` as broadcastable 2-D int32 tensors, so
the forward and dQ passes call them on ``(BLOCK_M, BLOCK_N)`` tiles (``i[:, None]``, ``j[None, :]``)
and the dK/dV pass on transposed ``(BLOCK_N, BLOCK_M)`` tiles (``j[:, None]``, ``i[None, :]``) with the
same code. Indices are relative to the sequence (varlen: to its start in the pack); query ``i`` sits at
key position ``i + seq_k - seq_q`` (bottom-right alignment), as in :mod:`fused_attention.inputs`.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Below this |x|, tanh is a Taylor polynomial: (1 - e) / (1 + e) with e = exp(-2|x|) cancels there.
_TANH_SERIES_LIMIT = tl.constexpr(0.5)


@triton.jit
def program_coordinates(seq, BLOCK: tl.constexpr, slots, FLAT: tl.constexpr):
    """(block, slot, batch) of this program: blocks of ``BLOCK`` along ``seq``, ``slots`` (heads), the
    batch. A (blocks, slots, batch) grid gives them as its three program ids, which the compiler
    re-reads where it needs them; ``FLAT`` (a batch past CUDA's 65535 programs on a grid's second and
    third axes) launches one axis in the same order, blocks fastest, and divides. Computed values stay
    live in registers instead: on sm_80/sm_90 three small dK/dV tiles spilled with them, so only calls
    that need the flat grid pay for it."""
    if FLAT:
        pid = tl.program_id(0)
        blocks = tl.cdiv(seq, BLOCK)
        rest = pid // blocks
        block = pid % blocks
        slot = rest % slots
        batch = rest // slots
    else:
        block = tl.program_id(0)
        slot = tl.program_id(1)
        batch = tl.program_id(2)
    return block, slot, batch


@triton.jit
def tanh(x):
    """tanh within a few float32 ulp; Triton's portable math (and its interpreter) has no tanh."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    far = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    # tanh x = x - x^3/3 + 2x^5/15 - ...: terms to x^17 leave < 1e-9 relative error for |x| < 0.5
    near = 6404582.0 / 10854718875.0
    near = near * x2 - 929569.0 / 638512875.0
    near = near * x2 + 21844.0 / 6081075.0
    near = near * x2 - 1382.0 / 155925.0
    near = near * x2 + 62.0 / 2835.0
    near = near * x2 - 17.0 / 315.0
    near = near * x2 + 2.0 / 15.0
    near = near * x2 - 1.0 / 3.0
    near = ax + ax * x2 * near
    t = tl.where(ax < _TANH_SERIES_LIMIT, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def tanh_approx(x):
    """The GPU's ``tanh.approx.f32`` (one MUFU instruction, relative error below 2**-10.9)."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def key_range(
    m0, seq_q, seq_k, window_left, window_right, key_length,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, KEY_LENGTHS: tl.constexpr,
):
    """``[lo, hi)``: the keys any query row in ``[m0, m0 + BLOCK_M)`` may see (``lo`` a multiple of
    BLOCK_N). Tiles outside are skipped, not computed and masked."""
    shift = seq_k - seq_q
    m1 = tl.minimum(m0 + BLOCK_M, seq_q)
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(hi, m1)
    if WINDOW_RIGHT:
        hi = tl.minimum(hi, m1 + shift + window_right)
    if KEY_LENGTHS:
        hi = tl.minimum(hi, key_length)
    lo = 0
    if WINDOW_LEFT:
        lo = tl.maximum(lo, m0 + shift - window_left)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.where(m0 < seq_q, hi, lo)  # a block past the end of its (varlen) sequence sees nothing
    return lo, hi


@triton.jit
def interior_range(
    m0, lo, hi, seq_q, seq_k, window_left, window_right, key_length,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, KEY_LENGTHS: tl.constexpr,
):
    """``(a, b, end)``: ``[a, b)`` within ``[lo, hi)`` (from :func:`key_range`), ``a - lo`` and ``b - a``
    multiples of BLOCK_N, the key tiles every query row ``m0 <= i < m0 + BLOCK_M`` sees whole (no key
    bound, causal, window or key-length check applies); keys ``j < end`` pass every right-side rule for
    every row. ``[lo, a)`` holds the window's left-edge tiles, ``[b, hi)`` the diagonal, the window's
    right edge and the ragged end. Keys ``j >= a`` pass the left window for every row, so tiles from
    ``b`` on need only the right-side rules, and left-edge tiles below ``end`` only the left window.
    Rows past ``seq_q`` are never stored."""
    shift = seq_k - seq_q
    a = lo
    if WINDOW_LEFT:  # the last row's left edge: j >= m0 + BLOCK_M - 1 + shift - window_left
        edge = tl.maximum(m0 + BLOCK_M - 1 + shift - window_left - lo, 0)
        a = lo + ((edge + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    a = tl.minimum(a, hi)
    end = tl.minimum(hi, seq_k)  # keys j < end are visible to the first row, hence to every row
    if CAUSAL:
        end = tl.minimum(end, m0 + 1)
    if WINDOW_RIGHT:
        end = tl.minimum(end, m0 + shift + window_right + 1)
    if KEY_LENGTHS:
        end = tl.minimum(end, key_length)
    b = a + (tl.maximum(end - a, 0) // BLOCK_N) * BLOCK_N
    return a, b, end


@triton.jit
def query_range(
    n0, seq_q, seq_k, window_left, window_right, key_length,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, KEY_LENGTHS: tl.constexpr,
):
    """``[lo, hi)``: the query rows that may see any key in ``[n0, n0 + BLOCK_N)`` (``lo`` a multiple
    of BLOCK_M); the mirror of :func:`key_range` for the dK/dV pass."""
    shift = seq_k - seq_q
    n1 = tl.minimum(n0 + BLOCK_N, seq_k)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(lo, n0)
    if WINDOW_RIGHT:
        lo = tl.maximum(lo, n0 - shift - window_right)
    hi = seq_q
    if WINDOW_LEFT:
        hi = tl.minimum(hi, n1 - shift + window_left)
    lo = (lo // BLOCK_M) * BLOCK_M
    empty = n0 >= seq_k
    if KEY_LENGTHS:
        empty = empty | (n0 >= key_length)
    hi = tl.where(empty, lo, hi)
    return lo, hi


@triton.jit
def alibi_bias(slope, i, j, shift):
    """What ALiBi subtracts from a score: ``slope * |i + shift - j|`` (query ``i`` at key ``i + shift``).
    The absolute value is taken in float (exactly the integer's): on the GPU it is then an operand
    modifier of the multiply, not an instruction per distance."""
    return slope * tl.abs((i + shift - j).to(tl.float32))


@triton.jit
def key_bounds(
    i, seq_q, seq_k, window_left, window_right, key_length,
    CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, KEY_LENGTHS: tl.constexpr,
):
    """``(first, last)``: query ``i`` may see keys ``first <= j <= last`` by the bounds, causal, window
    and key-length rules (``first`` is only meaningful with a left window). Per query, so a masked tile
    checks each element against one bound (two with a left window) instead of every rule."""
    shift = seq_k - seq_q
    last = i * 0 + (seq_k - 1)
    if CAUSAL:
        last = tl.minimum(last, i)
    if WINDOW_RIGHT:
        last = tl.minimum(last, i + shift + window_right)
    if KEY_LENGTHS:
        last = tl.minimum(last, key_length - 1)
    first = i * 0
    if WINDOW_LEFT:
        first = i + shift - window_left
    return first, last


@triton.jit
def keys_within(j, first, last, WINDOW_LEFT: tl.constexpr, SIDES: tl.constexpr = 3):
    """Whether key ``j`` lies in ``[first, last]`` (from :func:`key_bounds`). ``SIDES``: which bounds a
    tile needs (1: ``last``, 2: ``first``, 3: both; ``first`` only with a left window), the others being
    known to hold for the whole tile (:func:`interior_range`)."""
    if SIDES == 2:
        return j >= first
    visible = j <= last
    if WINDOW_LEFT and SIDES == 3:
        visible = visible & (j >= first)
    return visible


@triton.jit
def tile_keys_within(n0, first, last, BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr, SIDES: tl.constexpr):
    """:func:`keys_within` for the keys ``n0 + arange(BLOCK_N)`` of a tile (``first``, ``last``: a
    column per row). Each key offset is split as ``(offs & ~6) + (offs & 6)``: in the MMA accumulator
    layouts (mma.sync and wgmma) bits 1-2 of a column come from the thread's lane and the others are a
    constant per register, so the compiler folds ``n0`` and the lane part into each row's bound (a few
    subtractions per row) and compares every element against an immediate, instead of adding ``n0`` to
    every column first (SASS at 128x128, sm_90: 30-47 instructions fewer per masked tile). Exact in any
    layout; only the instruction count depends on it."""
    offs = tl.arange(0, BLOCK_N)[None, :]
    lane = offs & 6
    return keys_within(offs - lane, first - n0 - lane, last - n0 - lane, WINDOW_LEFT, SIDES)


@triton.jit
def visible_keys(
    i, j, seq_q, seq_k, window_left, window_right, key_length,
    CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, KEY_LENGTHS: tl.constexpr,
):
    """Whether query ``i`` may see key ``j`` by the bounds, causal, window and key-length rules (the
    query bound ``i < seq_q`` is the caller's: the forward never stores rows past it)."""
    first, last = key_bounds(i, seq_q, seq_k, window_left, window_right, key_length,
                             CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS)
    return keys_within(j, first, last, WINDOW_LEFT)


@triton.jit
def scores(
    qk, i, j, seq_q, seq_k, scale, softcap, slope, mask_base, stride_mask_m, stride_mask_n,
    window_left, window_right, key_length,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, KEY_LENGTHS: tl.constexpr,
):
    """Final float32 scores of a tile from ``qk = q . k``, ``-inf`` where a key is not visible, and the
    softcap's ``tanh`` (its derivative is needed in backward; unused otherwise).

    ``MASK``: 0 none, 1 bool (nonzero = attend), 2 float (added); the mask is read through its strides
    (stride 0 along broadcast dims) from ``mask_base``, which points at this (batch, head)'s slice.
    """
    s = qk * scale
    t = s
    if SOFTCAP:
        t = tanh(s / softcap)
        s = softcap * t
    shift = seq_k - seq_q
    if ALIBI:
        s = s - alibi_bias(slope, i, j, shift)
    visible = (i < seq_q) & visible_keys(
        i, j, seq_q, seq_k, window_left, window_right, key_length, CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, KEY_LENGTHS,
    )
    if MASK != 0:
        in_bounds = (i < seq_q) & (j < seq_k)
        offsets = i.to(tl.int64) * stride_mask_m + j.to(tl.int64) * stride_mask_n
        m = tl.load(mask_base + offsets, mask=in_bounds, other=0)
        if MASK == 1:
            visible = visible & (m != 0)
        else:
            s = s + m.to(tl.float32)
    return tl.where(visible, s, float("-inf")), t


@triton.jit
def keep_factor(dropout_p):
    """What a kept probability is multiplied by: ``1 / (1 - p)``, and 0 at ``p = 1`` (every one dropped;
    the threshold of :func:`dropout_keep` still lets through outputs of 2**32 - 256 and more)."""
    return tl.where(dropout_p < 1.0, 1.0 / tl.maximum(1.0 - dropout_p, 1e-30), 0.0)


@triton.jit
def dropout_keep(seed, stream, i, n0, dropout_p, BLOCK_N: tl.constexpr):
    """Keep-mask of the ``(queries i, keys n0 .. n0 + BLOCK_N)`` tile (``i`` a ``(BLOCK_M, 1)`` column,
    ``n0`` a multiple of 4; the dK/dV pass transposes the result).

    Philox keyed by ``seed`` and counted by (key // 4, query, batch * heads + head): one call gives
    the four keys of a quad their four outputs. A pure function of absolute indices, so the backward
    passes, whatever their tile shapes, regenerate exactly the forward's mask without storing it.
    An entry is kept when its 32-bit output is at least ``dropout_p * 2**32``.
    """
    quads = (n0 // 4 + tl.arange(0, BLOCK_N // 4))[None, :]
    zero = (i * 0 + quads * 0).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, quads.to(tl.uint32) + zero, i.to(tl.uint32) + zero,
                               zero + stream.to(tl.uint32), zero)
    r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # key 4q + w takes output w
    # the largest float32 below 2**32 bounds the threshold (at dropout_p = 1 a few outputs pass it:
    # keep_factor is 0 there)
    threshold = tl.minimum(dropout_p * 4294967296.0, 4294967040.0).to(tl.uint32)
    return r >= threshold
