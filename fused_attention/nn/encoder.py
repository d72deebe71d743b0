"""``TransformerEncoderLayer``: a drop-in for ``torch.nn.TransformerEncoderLayer`` whose self-attention is ours."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import _check_heads
from .masks import _additive, _attend, _check_mask_type
from .multihead import MultiheadAttention


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    r"""Drop-in for :class:`torch.nn.TransformerEncoderLayer` (and a subclass of it) whose self-attention
    is :class:`MultiheadAttention`.

    Same arguments, submodules, state_dict and ``forward(src, src_mask=None, src_key_padding_mask=None,
    is_causal=False)`` (masks in torch.nn's convention: bool True = ignore, float added; ``is_causal``
    is the hint that ``src_mask`` is causal). Seeded alike, it initialises the same weights as torch's
    layer. torch's inference fast path (``torch._transformer_encoder_layer_fwd``, which bypasses
    ``self_attn``) is never taken: every call runs the fused kernel. Nested tensors from
    ``torch.nn.TransformerEncoder``'s padding fast path run as varlen attention.

    Extra keyword-only arguments (for new models; the state_dict is unchanged):
        positional: ``None``, ``"rope"`` or ``"alibi"``, applied inside the attention
            (see :class:`MultiheadAttention`).
        backend: force an attention backend.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        positional: str | None = None,
        backend: str | None = None,
    ) -> None:
        _check_heads(d_model, nhead, "d_model", "nhead")
        super().__init__(
            d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
            layer_norm_eps=layer_norm_eps, batch_first=batch_first, norm_first=norm_first, bias=bias,
            device=device, dtype=dtype,
        )
        MultiheadAttention.from_torch_(self.self_attn, positional=positional, backend=backend)

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        _check_mask_type(src_key_padding_mask, "src_key_padding_mask", src_mask, "src_mask")
        _check_mask_type(src_mask, "src_mask")
        # torch turns bool masks into float ones here; only a mixed pair needs it (one type reaches the
        # attention), and a bool mask stays cheaper to read.
        if (
            src_mask is not None and src_key_padding_mask is not None
            and (src_mask.dtype == torch.bool) != (src_key_padding_mask.dtype == torch.bool)
        ):
            src_mask, src_key_padding_mask = (
                _additive(_attend(m), src.dtype) for m in (src_mask, src_key_padding_mask)
            )
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x
