"""Position-kernel providers: each of our position backends that serves the device, and the naive
formulas (``x * cos + rotate_half(x) * sin``; the classic ``x + pe[:L]``)."""

from __future__ import annotations

import torch

from ..backends.positional import POSITION_BACKENDS
from ..position import add_sinusoidal_position_encoding, apply_rotary_emb
from .position_case import PositionCase, naive_position
from .provider import Provider


def ours_position(name: str, interpreted: bool = False) -> Provider:
    """Our position backend ``name``, forced; refusals are the dispatcher's."""
    backend = POSITION_BACKENDS[name]

    def fn(case: PositionCase) -> torch.Tensor:
        if case.spec.op == "rope":
            return apply_rotary_emb(case.x, case.cos, case.sin, backend=name)
        return add_sinusoidal_position_encoding(case.x, batch_first=True, backend=name)

    return Provider(name, fn, lambda c: backend.reasons(c.x), family="position", slow_warmup=interpreted)


def position_providers(device: str) -> list[Provider]:
    """Our position backends that can serve ``device`` (interpreted Triton on the CPU counts as slow to
    warm up), then the naive formula."""
    dev = torch.device(device)
    mine = [
        ours_position(name, interpreted=name == "triton" and dev.type == "cpu")
        for name, backend in POSITION_BACKENDS.items()
        if backend.device_reason(dev) is None
    ]
    naive = Provider("naive", naive_position, family="position", extra_bytes=PositionCase.extra_bytes)
    return [*mine, naive]
