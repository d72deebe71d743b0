"""The tensors of one position-kernel :class:`~.spec.Spec` (``rope`` on x ``(B, H, L, D)``,
``sinusoidal`` on x ``(B, L, H * D)``), the naive formulas the kernels replace, and their float64
reference."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..position import rotary_cos_sin, sinusoidal_position_encoding
from .accuracy import Expected
from .case import random_tensor
from .spec import Spec


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def naive_rope(x: torch.Tensor, cos_full: torch.Tensor, sin_full: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``(L, D)`` tables, as Hugging Face's Llama writes it."""
    return x * cos_full + rotate_half(x) * sin_full


@dataclass
class PositionCase:
    """``x`` and the tables: ``cos``/``sin`` ``(L, D/2)`` float32 for our kernels; ``table`` the naive
    formula's ``(L, D)`` cos and sin (RoPE) or ``(L, H * D)`` encoding (sinusoidal), in x's dtype."""

    spec: Spec
    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    table: tuple[torch.Tensor, ...]

    is_varlen = False
    row_dim = 2

    def grad_inputs(self) -> tuple[torch.Tensor]:
        return (self.x,)

    def extra_bytes(self) -> int:
        """The naive formula's precomputed tables."""
        return sum(t.numel() * t.element_size() for t in self.table)

    def clone(self) -> PositionCase:
        return dataclasses.replace(self, x=self.x.detach().clone().requires_grad_(self.x.requires_grad))


def _tables(spec: Spec, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    seq, dim = spec.seq_q, spec.head_dim
    if spec.op == "rope":
        cos, sin = rotary_cos_sin(seq, dim, dtype=torch.float64)
        return tuple(torch.cat((t, t), dim=-1).to(device, dtype) for t in (cos, sin))
    return (sinusoidal_position_encoding(seq, spec.heads * dim, dtype=dtype, device=device),)


def make_position_case(spec: Spec, seed: int = 0) -> PositionCase:
    gen = torch.Generator().manual_seed(seed)
    b, h, seq, _, d = spec.shape
    shape = (b, h, seq, d) if spec.op == "rope" else (b, seq, h * d)
    x = random_tensor(shape, spec, gen, grad=spec.mode != "fwd")
    cos, sin = rotary_cos_sin(seq, d, device=spec.device)
    return PositionCase(spec, x, cos, sin, _tables(spec, spec.torch_dtype, spec.device))


def naive_position(case: PositionCase) -> torch.Tensor:
    """The naive formula: ``naive_rope`` or the classic ``x + pe[:L]``."""
    if case.spec.op == "rope":
        return naive_rope(case.x, *case.table)
    return case.x + case.table[0]


def position_reference(case: PositionCase, grad_out: torch.Tensor | None = None) -> Expected:
    """The naive formula in float64 on the CPU, with float64 tables (and the gradient of x)."""
    x = case.x.detach().cpu().double().requires_grad_(grad_out is not None)
    tables = _tables(case.spec, torch.float64, "cpu")
    with torch.set_grad_enabled(grad_out is not None):
        out = naive_rope(x, *tables) if case.spec.op == "rope" else x + tables[0]
        if grad_out is None:
            return Expected(out.detach())
        (grad,) = torch.autograd.grad(out, (x,), grad_out.detach().cpu().double())
    return Expected(out.detach(), (grad,))
