"""Custom ops for the ``triton`` backend's positional encodings: sinusoidal add and rotary (RoPE).

Each op is one opaque node for ``torch.compile``, with a fake implementation (``torch.empty_like``, so
fake outputs have the strides of real ones) and the autograd rules of :mod:`.position_rules`: the
rotation's gradient is the rotation by ``-theta`` (``conjugate`` flipped), the sinusoidal add's is the
identity. The C++ ops ``fused_attention::add_sinusoidal`` / ``rotary`` / ``rotary_`` / ``rotary_qk``
have the same semantics.

Importing this module imports Triton and defines the kernels: do it only when
:func:`fused_attention.kernels.triton.triton_unavailable_reason` returns None (on the CPU that needs
``TRITON_INTERPRET=1`` in the environment before this import).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import compile_cache
from ..kernels.triton import rotary as rotary_kernels
from ..kernels.triton import sinusoidal as sinusoidal_kernels
from .position_rules import register_position_autograd


@torch.library.custom_op("fused_attention::triton_add_sinusoidal", mutates_args=())
def triton_add_sinusoidal(x: Tensor, offsets: Tensor | None, offset: int, base: float) -> Tensor:
    """``x + PE`` for ``x`` of shape ``(B, S, D)`` (any strides, D even; float16/bfloat16/float32/float64).

    Row ``s`` of batch ``b`` sits at position ``p = (offsets[b] if offsets is not None else offset) + s``
    (``offsets``: int64 ``(B,)``) and gets ``PE[p, 2i] = sin(p * base**(-2i/D))``,
    ``PE[p, 2i+1] = cos(p * base**(-2i/D))``, computed in the kernel (no table) in float32, float64 for
    float64 ``x``. Returns a new tensor laid out like ``x``. The gradient with respect to ``x`` is the
    identity; ``offsets`` gets none.
    """
    out = torch.empty_like(x)
    sinusoidal_kernels.add_sinusoidal(x, out, offsets, offset, base)
    return out


@triton_add_sinusoidal.register_fake
def _(x, offsets, offset, base):
    return torch.empty_like(x)


@torch.library.custom_op("fused_attention::triton_rotary", mutates_args=())
def triton_rotary(
    x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool, conjugate: bool
) -> Tensor:
    """Rotary position embedding of ``x``; returns a new tensor laid out like ``x``.

    ``x``: ``(B, S, H, D)``, any strides, float16/bfloat16/float32/float64. ``cos``, ``sin``: ``(T, R/2)``
    float32 (float64 allowed with float64 ``x``), rows indexed by position; the first ``R`` features of
    each head are rotated and features ``d >= R`` pass through unchanged. ``positions``: int64
    ``(B, S)``, any strides (a stride-0 expanded ``arange`` is typical); each is clamped to ``[0, T-1]``.
    Pairs are ``(x[..., i], x[..., i + R/2])`` (half-split, GPT-NeoX/Llama) or
    ``(x[..., 2i], x[..., 2i+1])`` when ``interleaved`` (GPT-J); with ``c = cos[p, i]`` and
    ``s = sin[p, i]`` (``-sin[p, i]`` when ``conjugate``: the inverse rotation) a pair ``(a, b)`` becomes
    ``(a*c - b*s, b*c + a*s)``, computed in float32 (float64 for float64 ``x``). The gradient with
    respect to ``x`` is the rotation of the gradient with ``conjugate`` flipped; cos, sin and positions
    get none.
    """
    out = torch.empty_like(x)
    rotary_kernels.rotary(x, out, None, None, cos, sin, positions, interleaved, conjugate)
    return out


@triton_rotary.register_fake
def _(x, cos, sin, positions, interleaved, conjugate):
    return torch.empty_like(x)


@torch.library.custom_op("fused_attention::triton_rotary_", mutates_args=("x",))
def triton_rotary_(
    x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool, conjugate: bool
) -> None:
    """:func:`triton_rotary` in place: rotates the first ``R`` features of ``x`` and leaves the rest
    untouched. No autograd formula (torch.library registers none for mutating ops)."""
    rotary_kernels.rotary(x, x, None, None, cos, sin, positions, interleaved, conjugate)


@triton_rotary_.register_fake
def _(x, cos, sin, positions, interleaved, conjugate):
    return None


@torch.library.custom_op("fused_attention::triton_rotary_qk", mutates_args=())
def triton_rotary_qk(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool, conjugate: bool
) -> tuple[Tensor, Tensor]:
    """:func:`triton_rotary` of ``q`` ``(B, S, Hq, D)`` and ``k`` ``(B, S, Hk, D)`` in one kernel launch
    (``Hq != Hk`` allowed: GQA/MQA); returns ``(q_out, k_out)`` laid out like ``q`` and ``k``, with
    gradients for ``q`` and ``k``."""
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    rotary_kernels.rotary(q, q_out, k, k_out, cos, sin, positions, interleaved, conjugate)
    return q_out, k_out


@triton_rotary_qk.register_fake
def _(q, k, cos, sin, positions, interleaved, conjugate):
    return torch.empty_like(q), torch.empty_like(k)


register_position_autograd(
    "fused_attention::triton_rotary", "fused_attention::triton_rotary_qk", "fused_attention::triton_add_sinusoidal"
)

# These ops register on first use, after import: the compile caches key on them too.
compile_cache.tag_compile_caches()
