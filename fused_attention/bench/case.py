"""The tensors of one :class:`~.spec.Spec`: random inputs, our keyword arguments, and the dense mask
or bias the same problem takes in torch's SDPA and the naive formula (built once, outside the timing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..position import alibi_slopes
from ..reference import visibility
from .spec import Spec


@dataclass
class Case:
    """Inputs for one spec. Providers read ``query``/``key``/``value`` and either ``kwargs`` (our API's
    keyword arguments) or ``dense_mask()`` / ``is_causal`` (what torch's SDPA accepts)."""

    spec: Spec
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    kwargs: dict[str, Any]
    _dense: dict[str, torch.Tensor | None] = field(default_factory=dict, repr=False)

    @property
    def is_causal(self) -> bool:
        return self.spec.op == "causal"

    def dense_mask(self) -> torch.Tensor | None:
        """None (plain, causal), a float ``(1, H, L, S)`` ALiBi bias in the query dtype, or a bool
        ``(L, S)`` window mask (True = attend). Cached: built once per case."""
        if "mask" not in self._dense:
            self._dense["mask"] = dense_mask(
                self.spec, self.kwargs.get("alibi_slopes"), self.query.dtype, self.query.device
            )
        return self._dense["mask"]

    def grad_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query, self.key, self.value


def dense_mask(
    spec: Spec,
    slopes: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device | str,
    rows: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The op as a dense mask for the query rows ``rows`` (all when None); see :meth:`Case.dense_mask`.

    Positions follow our convention (bottom-right: query ``i`` sits at key position ``i + S - L``)."""
    seq_q, seq_k = spec.seq_q, spec.seq_k
    i = torch.arange(seq_q, device=device) if rows is None else rows.to(device)
    if spec.op == "alibi":
        assert slopes is not None
        j = torch.arange(seq_k, device=device)
        distance = (i.unsqueeze(1) + seq_k - seq_q - j.unsqueeze(0)).abs().to(torch.float64)
        bias = -slopes.to(device, torch.float64).reshape(1, -1, 1, 1) * distance
        return bias.to(dtype)
    if spec.op == "window":
        vis = visibility(seq_q, seq_k, window_size=spec.window_size, device=device)
        return vis if rows is None else vis[i]
    if spec.op == "causal" and rows is not None:  # only the row-sampled reference needs it dense
        vis = visibility(seq_q, seq_k, is_causal=True, device=device)
        return vis[i]
    return None


def make_case(spec: Spec, seed: int = 0) -> Case:
    """Random normal inputs (generated in float64 on the CPU, so every dtype and device sees the same
    values), requiring grad for ``fwd+bwd``."""
    gen = torch.Generator().manual_seed(seed)
    b, h, seq_q, seq_k, d = spec.shape

    def tensor(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(spec.device, spec.torch_dtype)
        return t.requires_grad_(spec.mode == "fwd+bwd")

    query, key, value = tensor(b, h, seq_q, d), tensor(b, h, seq_k, d), tensor(b, h, seq_k, d)
    kwargs: dict[str, Any] = {}
    if spec.op == "causal":
        kwargs["is_causal"] = True
    elif spec.op == "alibi":
        kwargs["alibi_slopes"] = alibi_slopes(h, device=spec.device)
    elif spec.op == "window":
        kwargs["window_size"] = spec.window_size
    return Case(spec, query, key, value, kwargs)
