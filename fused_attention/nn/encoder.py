"""``TransformerEncoderLayer``: a drop-in for ``torch.nn.TransformerEncoderLayer`` whose self-attention is ours."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
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

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self._ff_hidden(x))))

    def _ff_hidden(self, x: Tensor) -> Tensor:
        """``activation(linear1(x))``. In inference the ReLU is fused into linear1's matmul, as in torch's
        encoder fast path: at BERT-base sizes the separate ReLU's fresh 8 x 128 x 3072 tensor cost about
        as much as the attention kernel. Anywhere the fusion could be seen (a gradient, forward-mode AD or
        a torch.func transform, hooks, a subclassed linear1, autocast, another activation), torch's
        computation."""
        linear, act = self.linear1, self.activation
        relu = act is F.relu or (type(act) is nn.ReLU and _unhooked(act))
        if (
            relu
            and _plain_linear(linear)
            and linear.bias is not None
            and not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad or linear.bias.requires_grad))
            and type(x) is Tensor
            and not x.is_nested
            and x.dim() >= 2
            and x.dtype == linear.weight.dtype
            and x.device.type in ("cpu", "cuda")
            and not torch.is_autocast_enabled(x.device.type)
            and not _transformed(x, linear.weight, linear.bias)
        ):
            hidden = torch._addmm_activation(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t())
            return hidden.view(*x.shape[:-1], hidden.shape[-1])
        return act(linear(x))


def _transformed(*tensors: Tensor) -> bool:
    """Whether a torch.func transform (vmap, jvp, ...) is active or a tensor carries a forward-mode
    tangent: the fused op has no batching rule and no forward derivative."""
    return torch._C._are_functorch_transforms_active() or any(fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (not a subclass, not parametrized) with plain tensor weights and no hooks:
    computing its output another way is invisible."""
    return (
        type(module) is nn.Linear
        and type(module.weight) in (Tensor, nn.Parameter)
        and (module.bias is None or type(module.bias) in (Tensor, nn.Parameter))
        and _unhooked(module)
    )


def _unhooked(module: nn.Module) -> bool:
    """No forward hook, the module's own or global, could see the module's input or output."""
    return not (
        module._forward_hooks or module._forward_pre_hooks
        or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    )
