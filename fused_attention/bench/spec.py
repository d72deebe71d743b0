"""What one benchmark row measures: an op on a shape, a dtype, a mode and a device; its FLOP count
(attention) or its minimum bytes moved (position kernels)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

ATTENTION_OPS = (
    "plain", "causal", "alibi", "window", "softcap", "padding", "mask", "gqa", "varlen", "sinks", "decode",
)
POSITION_OPS = ("rope", "sinusoidal")
OPS = ATTENTION_OPS + POSITION_OPS
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = ("float16", "bfloat16", "float32", "float64")

WINDOW_LEFT = 256  # "window": window_size=(WINDOW_LEFT, 0), a causal sliding window
SOFTCAP = 50.0  # "softcap": Gemma 2's attention logit cap
GQA_GROUP = 4  # "gqa", "decode": query heads per key/value head (1 key/value head when heads do not divide)
DECODE_QUERIES = 1  # "decode": one new token per sequence against a cache of S keys (forward only)
BACKWARD_FACTOR = 2.5  # backward FLOPs = 2.5x forward (FlashAttention's accounting)
_MODE_FACTOR = {"fwd": 1.0, "bwd": BACKWARD_FACTOR, "fwd+bwd": 1.0 + BACKWARD_FACTOR}


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class Spec:
    """One problem. Attention: ``(B, H, L, D)`` queries against ``(B, Hkv, S, D)`` keys and values
    (``varlen``: ``B`` packed sequences of lengths :attr:`seq_lengths`). Position ops: ``rope`` on x
    ``(B, H, L, D)``, ``sinusoidal`` on x ``(B, L, H * D)``."""

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
        _check_choice("op", self.op, OPS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("dtype", self.dtype, DTYPES)
        for name in ("batch", "heads", "seq_q", "seq_k", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.op in POSITION_OPS + ("varlen",) and self.seq_q != self.seq_k:
            raise ValueError(f"op {self.op!r} needs seq_q == seq_k, got {self.seq_q} and {self.seq_k}")
        if self.op == "decode" and self.mode != "fwd":
            raise ValueError(f"op 'decode' is forward only (inference), got mode {self.mode!r}")
        if self.op in POSITION_OPS and self.head_dim % 2:
            raise ValueError(f"head_dim must be even for op {self.op!r} (sin/cos pairs), got {self.head_dim}")

    @property
    def family(self) -> str:
        """``"attention"`` (timed in TFLOP/s) or ``"position"`` (timed in GB/s)."""
        return "position" if self.op in POSITION_OPS else "attention"

    @property
    def counts_bytes(self) -> bool:
        """Whether the rate is GB/s of :attr:`bytes` (position kernels, and decoding, which is bound by
        reading K and V) rather than TFLOP/s."""
        return self.family == "position" or self.op == "decode"

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.batch, self.heads, self.seq_q, self.seq_k, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def kv_heads(self) -> int:
        if self.op not in ("gqa", "decode"):
            return self.heads
        kv = max(1, self.heads // GQA_GROUP)
        return kv if self.heads % kv == 0 else 1

    @property
    def window_size(self) -> tuple[int, int] | None:
        return (WINDOW_LEFT, 0) if self.op == "window" else None

    @property
    def seq_lengths(self) -> tuple[int, ...]:
        """``padding``: the key length of each batch entry (3/4 of ``S`` down to about 1/2);
        ``varlen``: each packed sequence's length (``L`` down to about ``L / 2``); else full lengths."""
        b, s = self.batch, self.seq_k
        if self.op == "padding":
            return tuple(max(1, s * (3 * b - i) // (4 * b)) for i in range(b))
        if self.op == "varlen":
            return tuple(max(1, s - s * i // (2 * b)) for i in range(b))
        return (s,) * b

    @property
    def visible_pairs(self) -> float:
        """Query-key pairs the op computes, summed over batch and heads: ``B H L S`` (halved for causal,
        as FlashAttention counts), the exact count for the causal window, the unpadded keys for
        ``padding``, and ``sum(len**2) / 2`` for the (causal) packed ``varlen`` sequences."""
        b, h, seq_q, seq_k, _ = self.shape
        if self.op in ("causal", "sinks"):  # sinks: causal, as gpt-oss
            return b * h * seq_q * seq_k / 2
        if self.op == "window":
            return b * h * _window_pairs(seq_q, seq_k, WINDOW_LEFT)
        if self.op == "padding":
            return h * seq_q * sum(self.seq_lengths)
        if self.op == "varlen":
            return h * sum(n * n for n in self.seq_lengths) / 2
        return b * h * seq_q * seq_k

    @property
    def flops(self) -> float:
        """Attention FLOPs: ``4 D`` per visible pair forward (two matmuls), backward 2.5x forward."""
        if self.family != "attention":
            raise ValueError(f"op {self.op!r} is a position kernel: it has bytes, not flops")
        return 4.0 * self.head_dim * self.visible_pairs * _MODE_FACTOR[self.mode]

    @property
    def bytes(self) -> float:
        """Minimum traffic. Position kernels: read x and write the result once per pass (the backward is
        one more pass over the gradient), plus RoPE's float32 cos/sin tables ``(L, D/2)`` each.
        ``decode``: reading K and V once (``2 B Hkv S D`` elements), what bounds a decode step."""
        itemsize = self.torch_dtype.itemsize
        if self.op == "decode":
            return float(2 * self.batch * self.kv_heads * self.seq_k * self.head_dim * itemsize)
        if self.family != "position":
            raise ValueError(f"op {self.op!r} is attention: it has flops, not bytes")
        per_pass = 2 * self.batch * self.heads * self.seq_q * self.head_dim * itemsize
        if self.op == "rope":
            per_pass += 2 * self.seq_q * (self.head_dim // 2) * 4
        passes = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[self.mode]
        return float(per_pass * passes)


def _window_pairs(seq_q: int, seq_k: int, left: int) -> int:
    """Visible pairs of a bottom-right causal window ``(left, 0)``: query ``i`` (key position
    ``p = i + S - L``) sees keys ``max(0, p - left) .. min(S - 1, p)``."""
    p = torch.arange(seq_q, dtype=torch.int64) + seq_k - seq_q
    count = p.clamp(max=seq_k - 1) - (p - left).clamp(min=0) + 1
    return int(count.clamp(min=0).sum())


def attention_flops(
    batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, *, causal: bool = False, mode: str = "fwd"
) -> float:
    """Forward ``4 B H L S D`` (two matmuls), halved for causal; backward 2.5x forward."""
    _check_choice("mode", mode, MODES)
    return Spec("causal" if causal else "plain", batch, heads, seq_q, seq_k, head_dim, mode=mode).flops


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
    tokens: int | None = None,
    hidden: int | None = None,
) -> list[Spec]:
    """Every combination, self-attention (``L = S``; ``decode``: ``DECODE_QUERIES`` rows against ``S``
    keys, forward only, so its other modes are left out), ordered so one problem's modes sit together.

    ``tokens``: instead of ``batches``, ``batch = tokens // seq`` (FlashAttention's fixed tokens per
    batch). ``hidden``: instead of ``heads``, ``heads = hidden // dim`` for each head dim."""
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
    dims = tuple(dims)  # (read twice: an iterator would be spent by the check)
    if hidden is not None and dims and hidden < max(dims):  # (it became one head of the larger size)
        raise ValueError(f"hidden ({hidden}) must be at least the head dim ({max(dims)}): heads = hidden // dim")
    specs = []
    for dt, b, h, d, s, op, mode in itertools.product(dtypes, batches, heads, dims, seqs, ops, modes):
        b = b if tokens is None else max(1, tokens // s)
        h = h if hidden is None else max(1, hidden // d)
        if op == "decode":
            if mode == "fwd":
                specs.append(Spec(op, b, h, DECODE_QUERIES, s, d, dt, mode, device))
            continue
        specs.append(Spec(op, b, h, s, s, d, dt, mode, device))
    return list(dict.fromkeys(specs))  # tokens/hidden collapse the batch/heads axes: drop repeats
