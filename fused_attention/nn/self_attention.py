"""``SelfAttention``: the classic tutorial multi-head self-attention, on the fused kernels."""

from __future__ import annotations

from torch import Tensor, nn

from ..backends import get_backend
from ..functional import scaled_dot_product_attention
from .checks import ModuleInputError, _broadcasts_to, _check_heads
from .masks import _causal_kwargs, _check_mask_type, _combine, _padding
from .positional import ALiBi, RotaryEmbedding
from .weights import _sink_logits, _sink_parameter


class SelfAttention(nn.Module):
    r"""The classic multi-head self-attention of countless tutorials, on the fused kernel.

    Four ``nn.Linear(d_model, d_model)`` layers named ``query``, ``key``, ``value`` and ``out``, so a
    state_dict saved from the tutorial class loads as is. ``forward(x)`` on batch-first ``x`` of shape
    ``(B, S, d_model)`` projects ``x`` three times, splits heads as
    ``view(B, S, num_heads, d_model // num_heads).transpose(1, 2)``, computes
    ``softmax(q k^T / sqrt(head_dim)) v`` with :func:`fused_attention.scaled_dot_product_attention`
    (never materializing the ``S x S`` matrix), merges heads back with ``transpose(1, 2)`` and applies
    ``out``. Returns ``(B, S, d_model)``.

    Args:
        d_model: model width; ``num_heads`` must divide it.
        num_heads: attention heads.
        dropout: dropout on the attention weights, applied in training mode only.
        bias: biases in the four linear layers.
        rotary: rotate q and k by RoPE (:class:`~fused_attention.nn.RotaryEmbedding` over the full head
            dim, positions ``0 .. S-1``).
        alibi: add ALiBi biases (:class:`~fused_attention.nn.ALiBi` slopes of ``num_heads`` heads).
        device, dtype: of the parameters.
        backend: force an attention backend.
        sinks: learned attention sinks (gpt-oss): a float32 parameter ``sinks`` of ``num_heads`` logits,
            zero-initialised (see :class:`MultiheadAttention`); off, there is no such parameter and the
            state_dict is the tutorial class's.

    Mask conventions of ``forward(x, attn_mask=None, is_causal=False, key_padding_mask=None)``:
        attn_mask: SDPA's convention (as the tutorials' ``masked_fill(mask == 0, -inf)``): bool True =
            attend, float = added to the scores; any shape broadcastable to ``(B, num_heads, S, S)``.
        is_causal: query ``i`` sees keys ``j <= i``. Unlike SDPA it may be combined with ``attn_mask``
            (both apply).
        key_padding_mask: ``(B, S)``, torch.nn.MultiheadAttention's convention: bool True = PADDING
            (ignored key), float = added. Pure right padding becomes the kernel's ``key_lengths``.
        A row that sees no key gives 0.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        rotary: bool = False,
        alibi: bool = False,
        device=None,
        dtype=None,
        backend: str | None = None,
        sinks: bool = False,
    ) -> None:
        super().__init__()
        if d_model <= 0 or num_heads <= 0:
            raise ModuleInputError(f"d_model and num_heads must be positive, got {d_model} and {num_heads}")
        _check_heads(d_model, num_heads, "d_model")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        if rotary and self.head_dim % 2:
            raise ModuleInputError(f"rotary=True needs an even head dim, got {self.head_dim}")
        if backend is not None:
            get_backend(backend)
        self.dropout = dropout
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.query = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.key = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.value = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.out = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.rotary = RotaryEmbedding(self.head_dim).to(device) if rotary else None
        self.alibi = ALiBi(num_heads).to(device) if alibi else None
        self.sinks = _sink_parameter(sinks, num_heads, device)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ModuleInputError(f"x must be (batch, seq, d_model={self.d_model}), got {shape}")
        for name, mask in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
            _check_mask_type(mask, name)
        batch, seq, _ = x.shape
        scores_shape = (batch, self.num_heads, seq, seq)
        if attn_mask is not None and not _broadcasts_to(tuple(attn_mask.shape), scores_shape):
            raise ModuleInputError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, num_heads, seq, seq) "
                f"= {scores_shape}"
            )
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, seq):
            raise ModuleInputError(
                f"key_padding_mask must have shape {(batch, seq)} (batch, seq), got "
                f"{tuple(key_padding_mask.shape)}"
            )
        q, k, v = (
            layer(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
            for layer in (self.query, self.key, self.value)
        )
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        padding, key_lengths = _padding(key_padding_mask)
        mask = _combine(attn_mask, padding, q.dtype)
        kwargs, mask = _causal_kwargs(mask, seq, seq, x.device) if is_causal else ({}, mask)
        out = scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            key_lengths=key_lengths, alibi_slopes=None if self.alibi is None else self.alibi(q.device),
            sinks=_sink_logits(self.sinks), backend=self.backend, **kwargs,
        )
        return self.out(out.transpose(1, 2).reshape(batch, seq, self.d_model))
