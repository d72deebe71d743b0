"""The memory layout of attention's outputs and gradients: the layout of the inputs they belong to.

Models make q, k, v by viewing a ``(B, N, H * D)`` projection as ``(B, N, H, D)`` and transposing it to
``(B, H, N, D)``, and undo that on the output with ``.transpose(1, 2).contiguous()`` (on the gradients, the
transpose's and view's backward). An output laid out ``(B, N, H, D)`` in memory makes both free; a
contiguous ``(B, H, N, D)`` one costs a full copy per call (torch's CPU flash kernel returns ``(B, N, H,
D)`` memory for that reason). Every dense attention op allocates by :func:`empty_in_layout_of` (their fake
tensors too); the cpu extension's rule (``csrc/cpu/op_inputs.h``) is the same.
"""

from __future__ import annotations

import torch


def empty_in_layout_of(like: torch.Tensor, last: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty ``(B, H, N, last)`` tensor laid out as ``like`` ``(B, H, N, *)``: ``(B, N, H, last)`` in
    memory, transposed, where like's heads lie closer together than its tokens, else contiguous."""
    b, h, n, _ = like.shape
    dtype = like.dtype if dtype is None else dtype
    if h > 1 and n > 1 and like.stride(1) < like.stride(2):
        return like.new_empty(b, n, h, last, dtype=dtype).transpose(1, 2)
    return like.new_empty(b, h, n, last, dtype=dtype)


def empty_gradient_of(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A gradient for ``like``, in its layout (:func:`empty_in_layout_of`)."""
    return empty_in_layout_of(like, like.shape[-1], dtype)
