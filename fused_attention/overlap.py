"""Whether two strided tensors share memory, decided exactly from their sizes, strides and addresses.

torch's helpers answer from address ranges (``torch._C._overlaps``: True for any two views of one
storage) or give up on views that are not dense (``get_overlap_status``: "too hard"); but two views of
one fused QKV tensor (``qkv[..., 0, :]`` and ``qkv[..., 1, :]``, or interleaved heads) interleave in
one address range without sharing an element, and must be told apart from views that do share some.
"""

from __future__ import annotations

import torch

# Candidates the search may try before it marks the elements instead: a few per dimension for the
# layouts views are made of; only contrived strides come near it.
_SEARCH_BUDGET = 100_000


class _TooHard(Exception):
    pass


def share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether some byte of an element of ``a`` is a byte of an element of ``b``."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    # An address of a minus one of b is a sum of c * m over the byte strides c, with multipliers m in a
    # range (a's indices, b's negated, and the bytes within an element): the two share a byte exactly
    # when some choice of multipliers gives the distance between their first elements.
    ranges: dict[int, list[int]] = {}  # stride: [lo, hi] (equal strides add their ranges)
    for t, side in ((a, 1), (b, 0)):
        for size, stride in (*zip(t.shape, _byte_strides(t)), (t.element_size(), 1)):
            if size > 1 and stride:
                ranges.setdefault(stride, [0, 0])[side] += size - 1 if side else 1 - size
    terms = sorted(((c, lo, hi) for c, (lo, hi) in ranges.items()), reverse=True)
    try:
        return _reachable(terms, b.data_ptr() - a.data_ptr())
    except _TooHard:
        return _marked_overlap(a, b)


def _byte_strides(t: torch.Tensor) -> list[int]:
    return [s * t.element_size() for s in t.stride()]


def _reachable(terms: list[tuple[int, int, int]], target: int) -> bool:
    """Whether ``sum(c * m) == target`` for integers ``lo <= m <= hi`` of the terms ``(c, lo, hi)``,
    largest ``c`` first: each level tries only the multipliers that leave a remainder the smaller terms
    can still reach."""
    low_after, high_after = [0] * (len(terms) + 1), [0] * (len(terms) + 1)
    for k in range(len(terms) - 1, -1, -1):
        c, lo, hi = terms[k]
        low_after[k], high_after[k] = low_after[k + 1] + c * lo, high_after[k + 1] + c * hi
    tries = 0

    def search(k: int, rest: int) -> bool:
        nonlocal tries
        if k == len(terms):
            return rest == 0
        c, lo, hi = terms[k]
        first = max(lo, -((high_after[k + 1] - rest) // c))  # ceil((rest - high_after) / c)
        last = min(hi, (rest - low_after[k + 1]) // c)
        for m in range(first, last + 1):
            tries += 1
            if tries > _SEARCH_BUDGET:
                raise _TooHard
            if search(k + 1, rest - c * m):
                return True
        return False

    return search(0, target)


def _marked_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same answer by marking a's bytes in a scratch buffer that spans both (memory of that span)."""
    ends = [(t.data_ptr(), t.data_ptr() + sum((n - 1) * s for n, s in zip(t.shape, _byte_strides(t))) +
             t.element_size()) for t in (a, b)]
    low = min(start for start, _ in ends)
    marks = torch.zeros(max(end for _, end in ends) - low, dtype=torch.bool, device=a.device)

    def bytes_of(t: torch.Tensor) -> torch.Tensor:
        return marks.as_strided((*t.shape, t.element_size()), (*_byte_strides(t), 1), t.data_ptr() - low)

    bytes_of(a).fill_(True)
    return bool(bytes_of(b).any())
