"""What one benchmark row measures: an op on a shape, a dtype, a mode and a device; and its FLOP count."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

OPS = ("plain", "causal", "alibi", "window")
MODES = ("fwd", "fwd+bwd")
DTYPES = ("float16", "bfloat16", "float32", "float64")
WINDOW_LEFT = 256  # the "window" op: window_size=(WINDOW_LEFT, 0), a causal sliding window
BACKWARD_FACTOR = 2.5  # backward FLOPs = 2.5x forward (FlashAttention's accounting)


@dataclass(frozen=True)
class Spec:
    """One attention problem: ``(B, H, L, D)`` queries against ``(B, H, S, D)`` keys and values."""

    op: str
    batch: int
    heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    dtype: str = "float32"  # a torch dtype name without the ``torch.`` prefix
    mode: str = "fwd"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("batch", "heads", "seq_q", "seq_k", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.batch, self.heads, self.seq_q, self.seq_k, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def window_size(self) -> tuple[int, int] | None:
        return (WINDOW_LEFT, 0) if self.op == "window" else None

    @property
    def flops(self) -> float:
        return attention_flops(
            self.batch,
            self.heads,
            self.seq_q,
            self.seq_k,
            self.head_dim,
            causal=self.op == "causal",
            mode=self.mode,
        )


def attention_flops(
    batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, *, causal: bool = False, mode: str = "fwd"
) -> float:
    """Forward ``4 B H L S D`` (two matmuls), halved for causal; ``fwd+bwd`` adds 2.5x forward."""
    flops = 4.0 * batch * heads * seq_q * seq_k * head_dim
    if causal:
        flops /= 2
    if mode == "fwd+bwd":
        flops *= 1 + BACKWARD_FACTOR
    elif mode != "fwd":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return flops


def sweep(
    ops: Iterable[str] = ("plain", "causal", "alibi"),
    seqs: Iterable[int] = (512, 1024),
    *,
    batches: Iterable[int] = (1,),
    heads: Iterable[int] = (8,),
    dims: Iterable[int] = (64,),
    dtypes: Iterable[str] = ("float32",),
    modes: Iterable[str] = ("fwd",),
    device: str = "cpu",
) -> list[Spec]:
    """Every combination, self-attention (``L = S``), ordered so one problem's modes sit together."""
    return [
        Spec(op, b, h, s, s, d, dt, mode, device)
        for dt, b, h, d, s, op, mode in itertools.product(dtypes, batches, heads, dims, seqs, ops, modes)
    ]
