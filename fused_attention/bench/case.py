"""The tensors of one attention :class:`~.spec.Spec`: random inputs, our keyword arguments, and the
dense mask or bias the same problem takes in torch's SDPA and the naive formula (built once, outside
the timing)."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from ..position import alibi_slopes
from .spec import SOFTCAP, Spec

# Ops whose dense form is a mask or bias that only torch-style providers need: its bytes count towards
# their peak memory (the "mask" op's float mask is every provider's input, so it does not).
EXTRA_DENSE_OPS = frozenset({"alibi", "window", "padding"})


def random_tensor(shape: tuple[int, ...], spec: Spec, gen: torch.Generator, grad: bool = False) -> torch.Tensor:
    """Normal values drawn in float64 on the CPU, so every dtype and device sees the same numbers."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(spec.device, spec.torch_dtype)
    return t.requires_grad_(grad)


@dataclass
class Case:
    """Inputs for one spec. ``query`` ``(B, H, L, D)``, ``key``/``value`` ``(B, Hkv, S, D)``; for
    ``varlen`` they are packed ``(total, H, D)`` with ``cu_seqlens``. Providers read ``kwargs`` (our
    API's keyword arguments) or :meth:`dense_mask` / :attr:`is_causal` (what torch's SDPA accepts)."""

    spec: Spec
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    kwargs: dict[str, Any]
    cu_seqlens: torch.Tensor | None = None
    _dense: dict[str, torch.Tensor | None] = field(default_factory=dict, repr=False)

    @property
    def is_causal(self) -> bool:
        return self.spec.op in ("causal", "sinks")

    @property
    def enable_gqa(self) -> bool:
        """Whether query heads share key/value heads (torch's ``enable_gqa``)."""
        return self.spec.op in ("gqa", "decode")

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def row_dim(self) -> int:
        """The query-row dim of the inputs and output (packed tokens for varlen)."""
        return 0 if self.is_varlen else 2

    def dense_mask(self) -> torch.Tensor | None:
        """The op as torch's SDPA takes it (cached): None (plain, causal, softcap, gqa), a float
        ``(1, H, L, S)`` ALiBi bias or the float ``(1, 1, L, S)`` mask in the query dtype, a bool
        ``(L, S)`` window or ``(B, 1, 1, S)`` key-padding mask (True = attend)."""
        if "mask" not in self._dense:
            self._dense["mask"] = dense_mask(self, self.query.dtype, self.query.device)
        return self._dense["mask"]

    def extra_bytes(self) -> int:
        """Bytes of the dense form that torch-style providers hold beyond our API's inputs."""
        mask = self.dense_mask() if self.spec.op in EXTRA_DENSE_OPS else None
        return 0 if mask is None else mask.numel() * mask.element_size()

    def grad_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query, self.key, self.value

    def sequences(self) -> list[tuple[int, int]]:
        """``(start, end)`` rows of each packed sequence (varlen)."""
        assert self.cu_seqlens is not None
        bounds = self.cu_seqlens.tolist()
        return list(itertools.pairwise(bounds))

    def clone(self) -> Case:
        """The same values in fresh tensors (CUDA timing rotates through copies so caches do not flatter)."""
        grad = self.spec.mode != "fwd"
        q, k, v = (t.detach().clone().requires_grad_(grad) for t in self.grad_inputs())
        return dataclasses.replace(self, query=q, key=k, value=v, _dense=self._dense)


def dense_mask(
    case: Case, dtype: torch.dtype, device: torch.device | str, rows: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The op of ``case`` as a dense mask or bias for query rows ``rows`` (all when None); see
    :meth:`Case.dense_mask`. Positions follow our convention (bottom-right: query ``i`` sits at key
    position ``i + S - L``). Varlen has no single dense form (its sequences are taken one at a time)."""
    spec = case.spec
    seq_q, seq_k = spec.seq_q, spec.seq_k
    i = torch.arange(seq_q, device=device) if rows is None else rows.to(device)
    if spec.op == "alibi":
        slopes = case.kwargs["alibi_slopes"]
        j = torch.arange(seq_k, device=device)
        distance = (i.unsqueeze(1) + seq_k - seq_q - j.unsqueeze(0)).abs().to(torch.float64)
        bias = -slopes.to(device, torch.float64).reshape(1, -1, 1, 1) * distance
        return bias.to(dtype)
    if spec.op in ("window", "causal", "sinks") and (spec.op == "window" or rows is not None):
        # Row by row, never the full L x S for sampled rows (the causal mask is only needed dense then).
        pos = i.unsqueeze(1) + seq_k - seq_q
        j = torch.arange(seq_k, device=device).unsqueeze(0)
        if spec.op in ("causal", "sinks"):
            return j <= i.unsqueeze(1)
        return (j <= pos) & (j >= pos - spec.window_size[0])
    if spec.op == "padding":
        lengths = case.kwargs["key_lengths"].to(device)
        return torch.arange(seq_k, device=device) < lengths.reshape(-1, 1, 1, 1)
    if spec.op == "mask":
        mask = case.kwargs["attn_mask"]
        return mask[:, :, i.to(mask.device)].to(device, dtype)
    return None


def make_case(spec: Spec, seed: int = 0) -> Case:
    """Random normal inputs requiring grad for the ``bwd`` modes, and the op's keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    b, h, seq_q, seq_k, d = spec.shape
    grad = spec.mode != "fwd"
    if spec.op == "varlen":
        lengths = torch.tensor((0, *spec.seq_lengths), dtype=torch.int32)
        cu = lengths.cumsum(0, dtype=torch.int32).to(spec.device)
        total = int(cu[-1])
        q, k, v = (random_tensor((total, h, d), spec, gen, grad) for _ in range(3))
        kwargs = {"is_causal": True}  # packed documents, as in causal LM training
        return Case(spec, q, k, v, kwargs, cu_seqlens=cu)
    query = random_tensor((b, h, seq_q, d), spec, gen, grad)
    key, value = (random_tensor((b, spec.kv_heads, seq_k, d), spec, gen, grad) for _ in range(2))
    kwargs: dict[str, Any] = {}
    if spec.op == "causal":
        kwargs["is_causal"] = True
    elif spec.op == "alibi":
        kwargs["alibi_slopes"] = alibi_slopes(h, device=spec.device)
    elif spec.op == "window":
        kwargs["window_size"] = spec.window_size
    elif spec.op == "softcap":
        kwargs["softcap"] = SOFTCAP
    elif spec.op == "padding":
        kwargs["key_lengths"] = torch.tensor(spec.seq_lengths, dtype=torch.int64, device=spec.device)
    elif spec.op == "mask":
        kwargs["attn_mask"] = random_tensor((1, 1, seq_q, seq_k), spec, gen)
    elif spec.op in ("gqa", "decode"):  # decode: one new token sees the whole cache (no mask needed)
        kwargs["enable_gqa"] = True
    elif spec.op == "sinks":  # causal, as gpt-oss uses its learned sinks
        kwargs["is_causal"] = True
        kwargs["sinks"] = torch.randn(h, generator=gen, dtype=torch.float64).to(spec.device, torch.float32)
    return Case(spec, query, key, value, kwargs)
