"""Self-test of every available position-encoding backend (RoPE and the sinusoidal add), part of
``python -m fused_attention check``: each backend against the textbook formulas evaluated here in float64
and in the tested dtype, by the same tolerance policy as attention (:func:`.tolerance.within_tolerance`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .backends.positional import POSITION_BACKENDS
from .position import add_sinusoidal_position_encoding, apply_rotary_emb, rotary_cos_sin
from .tolerance import FORWARD_FACTOR, within_tolerance

_DTYPES = (torch.float32, torch.bfloat16)


def _rope_formula(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x ``(B, H, S, D)`` rotated with ``x * cos + rotate(x) * sin`` in x's dtype, positions 0..S-1."""
    r = 2 * cos.shape[1]
    c, s = cos[: x.shape[2]].to(x.dtype), sin[: x.shape[2]].to(x.dtype)
    head = x[..., :r]
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        rotated = torch.stack((-head[..., 1::2], head[..., 0::2]), -1).flatten(-2)
    else:
        c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        rotated = torch.cat((-head[..., r // 2 :], head[..., : r // 2]), -1)
    return torch.cat((head * c + rotated * s, x[..., r:]), -1)


def _sinusoidal_formula(x: torch.Tensor) -> torch.Tensor:
    """x ``(S, B, D)`` + the Transformer paper's table, in x's dtype."""
    seq, _, dim = x.shape
    angles = torch.arange(seq, dtype=x.dtype)[:, None] / 10000.0 ** (torch.arange(0, dim, 2, dtype=x.dtype) / dim)
    table = torch.stack((angles.sin(), angles.cos()), -1).flatten(-2)
    return x + table[:, None, :]


def _cases(gen: torch.Generator):
    x = torch.randn(2, 3, 37, 40, dtype=torch.float64, generator=gen)
    cos, sin = rotary_cos_sin(64, 32, dtype=torch.float64)
    for interleaved in (False, True):
        name = "rope_" + ("interleaved" if interleaved else "half") + "_partial"
        yield (
            name,
            x,
            lambda t, backend, i=interleaved: apply_rotary_emb(t, cos.float(), sin.float(), interleaved=i, backend=backend),
            lambda t, i=interleaved: _rope_formula(t, cos, sin, i),
        )
    seq_first = torch.randn(41, 3, 24, dtype=torch.float64, generator=gen)
    yield (
        "sinusoidal_add",
        seq_first,
        lambda t, backend: add_sinusoidal_position_encoding(t, backend=backend),
        _sinusoidal_formula,
    )


def run_position_check(print_fn: Callable[[str], None], devices: list[str]) -> tuple[int, int]:
    """Prints one row per (backend, device, case, dtype); returns ``(passed, failed)``."""
    passed = failed = 0
    for name, backend in POSITION_BACKENDS.items():
        for device in devices:
            reason = backend.device_reason(torch.device(device))
            if reason is not None:
                print_fn(f"{name:8s} {device:6s} {'(position kernels)':24s} skipped: {reason}")
                continue
            for case, x64, ours, formula in _cases(torch.Generator().manual_seed(3)):
                ref64 = formula(x64)
                for dtype in _DTYPES:
                    x = x64.to(dtype)
                    ok, err, bound = within_tolerance(
                        ours(x.to(device), name).cpu(), formula(x), ref64, FORWARD_FACTOR
                    )
                    passed, failed = passed + ok, failed + (not ok)
                    print_fn(
                        f"{name:8s} {device:6s} {case:24s} {str(dtype).replace('torch.', ''):9s} "
                        f"{err:.1e} / {bound:.1e}   {'PASS' if ok else 'FAIL'}"
                    )
    return passed, failed
