"""Attention modules: drop-ins for ``torch.nn.MultiheadAttention`` and ``torch.nn.TransformerEncoderLayer``,
and the classic tutorial ``SelfAttention``. Each projects its inputs and calls one fused attention function
(:func:`fused_attention.scaled_dot_product_attention`, or :func:`fused_attention.varlen_attention` for
nested tensors)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import get_backend
from ..errors import AttentionArgumentError, AttentionTypeError
from ..functional import scaled_dot_product_attention, varlen_attention
from ..position import apply_rotary_emb_qk
from .positional import ALiBi, RotaryEmbedding

__all__ = [
    "ModuleInputError", "ModuleTypeError", "MultiheadAttention", "SelfAttention", "TransformerEncoderLayer",
]

_POSITIONAL = (None, "rope", "alibi")


class ModuleInputError(AttentionArgumentError, AssertionError):
    """Bad input to an attention module: a ``ValueError`` that is also a ``RuntimeError`` and an
    ``AssertionError``, the classes torch's modules raise for the same mistakes, so ``except`` clauses
    written for torch keep working."""


class ModuleTypeError(AttentionTypeError, AssertionError):
    """Bad type or dtype given to an attention module (a ``TypeError``, ``RuntimeError`` and
    ``AssertionError``)."""


# --- masks --------------------------------------------------------------------------------------------
# Inside this file masks are in SDPA's convention: bool True = attend, float = added to the score.


def _check_mask_type(mask: object, name: str, other: Tensor | None = None, other_name: str = "") -> None:
    """torch's rules (``F._canonical_mask``): bool or floating masks only; mixing types warns."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise ModuleTypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ModuleTypeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")
    if other is not None and other.dtype != mask.dtype:
        warnings.warn(
            f"Support for mismatched {name} and {other_name} is deprecated. Use same type for both instead.",
            stacklevel=3,
        )


def _attend(ignore_mask: Tensor) -> Tensor:
    """torch.nn's mask convention (bool True = ignore; float added) to SDPA's (bool True = attend)."""
    return ignore_mask.logical_not() if ignore_mask.dtype == torch.bool else ignore_mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _combine(mask: Tensor | None, other: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """One SDPA-convention mask that applies both (AND for bools, sum otherwise, as torch adds them)."""
    if mask is None or other is None:
        combined = other if mask is None else mask
    elif mask.dtype == torch.bool and other.dtype == torch.bool:
        combined = mask & other
    else:
        combined = _additive(mask, dtype) + _additive(other, dtype)
    if combined is not None and combined.is_floating_point() and combined.dtype not in (torch.float32, dtype):
        combined = combined.to(dtype)  # the kernels take float32 or the query dtype
    return combined


def _pad_keys(mask: Tensor, extra: int) -> Tensor:
    """Appends ``extra`` visible key columns (torch pads its masks this way for bias_kv / zero_attn)."""
    fill = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
    return torch.cat([mask, fill(*mask.shape[:-1], extra)], dim=-1)


def padding_lengths(key_padding_mask: Tensor) -> tuple[bool, Tensor | None]:
    """Whether ``key_padding_mask`` (``(B, S)``, True or ``-inf`` = padding) only pads on the right, and if
    so the number of real keys per row (``None`` when nothing is padded).

    Reading the mask costs a device sync on GPUs and a graph break under ``torch.compile``, so only CPU
    masks in eager mode are read; otherwise ``(False, None)``, and the caller applies the mask as is (a
    broadcast ``(B, 1, 1, S)`` mask: still never an ``L x S`` tensor). A float mask counts when it holds
    only 0 and ``-inf`` (what ``torch.nn.TransformerEncoderLayer`` turns a bool mask into).
    """
    mask = key_padding_mask
    if mask.device.type != "cpu" or torch.compiler.is_compiling() or mask.requires_grad:
        return False, None
    if mask.dtype == torch.bool:
        ignored = mask
    else:
        ignored = mask == float("-inf")
        if not bool((ignored | (mask == 0)).all()):
            return False, None
    seq = ignored.shape[-1]
    lengths = seq - ignored.sum(-1)
    if not torch.equal(ignored, torch.arange(seq, device=ignored.device) >= lengths.unsqueeze(-1)):
        return False, None
    return True, (None if bool((lengths == seq).all()) else lengths)


def _padding(key_padding_mask: Tensor | None, extra_keys: int = 0) -> tuple[Tensor | None, Tensor | None]:
    """``(mask, key_lengths)`` for a torch.nn-convention ``(B, S)`` key padding mask: the lengths when
    it is pure right padding (and no extra key follows the padding), else a ``(B, 1, 1, S)`` mask."""
    if key_padding_mask is None:
        return None, None
    if not extra_keys:
        right_padded, lengths = padding_lengths(key_padding_mask)
        if right_padded:
            return None, lengths
    mask = _attend(key_padding_mask)
    if extra_keys:
        mask = _pad_keys(mask, extra_keys)
    return mask[:, None, None, :], None


def _causal_kwargs(
    mask: Tensor | None, seq_q: int, seq_k: int, device: torch.device
) -> tuple[dict[str, object], Tensor | None]:
    """Top-left causal attention as SDPA arguments. ``is_causal`` cannot be combined with a mask, but an
    equal bottom-right window can when ``L >= S``; otherwise the rule is folded into the mask."""
    if mask is None:
        return {"is_causal": True}, None
    if seq_q >= seq_k:
        return {"window_size": (-1, seq_q - seq_k)}, mask
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril()
    return {}, _combine(mask, visible, mask.dtype if mask.is_floating_point() else torch.float32)


def _attention_scores(
    q: Tensor, k: Tensor, mask: Tensor | None, key_lengths: Tensor | None, causal: bool, slopes: Tensor | None
) -> Tensor:
    """``q k^T / sqrt(E)`` with the bias and every mask applied, ``(B, H, L, S)``, in float32 (float64 for
    float64): the scores the kernel normalised, so ``exp(scores - lse)`` are its softmax weights."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    # One (B, H, L, S) tensor, updated in place: no step's backward needs the scores it overwrites. q is
    # scaled before the product, as torch's module does (one pass over L x E, not over L x S). Contiguous
    # factors give contiguous scores: the softmax over a strided L x S is 3x slower.
    q = (q.to(compute) * (1.0 / math.sqrt(q.shape[-1]))).contiguous()
    scores = torch.matmul(q, k.to(compute).contiguous().transpose(-2, -1))
    seq_q, seq_k = scores.shape[-2:]
    if slopes is not None:  # ALiBi, bottom-right aligned as in scaled_dot_product_attention
        rows = torch.arange(seq_q, device=q.device).unsqueeze(1) + (seq_k - seq_q)
        distance = (rows - torch.arange(seq_k, device=q.device)).abs().to(compute)
        scores.sub_(slopes.to(compute).view(1, -1, 1, 1) * distance)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask.to(compute))
    if key_lengths is not None:
        padded = torch.arange(seq_k, device=q.device) >= key_lengths.view(-1, 1, 1, 1)
        scores.masked_fill_(padded, float("-inf"))
    if causal:
        future = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).triu(1)
        scores.masked_fill_(future, float("-inf"))
    return scores


class _WeightsFromLse(torch.autograd.Function):
    """``softmax(scores)`` rebuilt from the kernel's log-sum-exp, ``exp(scores - lse)``: the lse replaces
    the softmax's row-max pass. The rounding of a float32 lse (about ``|lse| * eps``) would scale a whole
    row by ``1 + O(|lse| eps)``, so each row is renormalised by its sum (a pass a softmax makes too),
    which keeps the weights as accurate as torch's softmax. Rows that see no key get 0 (not NaN). The
    backward is the softmax backward, so gradients through the returned weights are exact."""

    @staticmethod
    def forward(ctx, scores: Tensor, lse: Tensor) -> Tensor:
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # empty rows: exp(-inf - inf) = 0
        weights = (scores - lse.unsqueeze(-1)).exp_()
        weights = weights.div_(weights.sum(-1, keepdim=True).clamp_(min=torch.finfo(weights.dtype).tiny))
        ctx.save_for_backward(weights)
        return weights

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (weights,) = ctx.saved_tensors
        return weights * (grad - (grad * weights).sum(-1, keepdim=True)), None


def _safe_softmax(scores: Tensor, may_hide_rows: bool = True) -> Tensor:
    """Softmax whose rows that see no key are 0 (as the kernels give), not NaN. ``may_hide_rows=False``
    (no mask, padding or causal rule) skips the search for such rows."""
    weights = torch.softmax(scores, dim=-1)
    if not may_hide_rows:
        return weights
    return weights.masked_fill(torch.isneginf(scores.amax(-1, keepdim=True)), 0.0)


def _softmax_with_sinks(scores: Tensor, sinks: Tensor) -> Tensor:
    """The attention weights with learned sinks: the softmax over the scores and one more column per
    row, the head's sink logit, which is then dropped (so a row sums to ``1 - p_sink``)."""
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return _safe_softmax(torch.cat([scores, sink], dim=-1))[..., :-1]


def _check_sinks_flag(enabled: object) -> None:
    if not isinstance(enabled, bool):
        raise ModuleTypeError(f"sinks must be a bool, got {type(enabled).__name__}")


def _sink_parameter(enabled: object, num_heads: int, device) -> nn.Parameter | None:
    """A learned sink logit per head (float32, zero-initialised), or None: off, it is no parameter at
    all, so state_dicts stay those of the modules without sinks."""
    _check_sinks_flag(enabled)
    return nn.Parameter(torch.zeros(num_heads, device=device, dtype=torch.float32)) if enabled else None


def _sink_logits(sinks: nn.Parameter | None) -> Tensor | None:
    """The sinks as the functional API takes them (float32 or float64, even in a 16-bit module)."""
    if sinks is None or sinks.dtype in (torch.float32, torch.float64):
        return sinks
    return sinks.float()


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    return len(shape) <= len(target) and all(d in (1, t) for d, t in zip(reversed(shape), reversed(target)))


def _check_heads(embed_dim: int, num_heads: int, name: str = "embed_dim") -> None:
    positive = isinstance(embed_dim, int) and isinstance(num_heads, int) and embed_dim > 0 and num_heads > 0
    if positive and embed_dim % num_heads:
        raise ModuleInputError(f"{name} ({embed_dim}) must be divisible by num_heads ({num_heads})")


def _keep_torch_fast_paths_off(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook. ``torch.nn.TransformerEncoderLayer``'s inference fast path calls
    ``torch._transformer_encoder_layer_fwd`` on its ``self_attn``'s weights and never calls
    ``self_attn``; torch skips that path while any submodule has a hook, so this keeps our kernel in the
    loop however the layer is built (ours, patched, or a user's subclass)."""


# --- MultiheadAttention -------------------------------------------------------------------------------


def _check_options(module: nn.MultiheadAttention, positional: object, backend: object) -> None:
    if positional not in _POSITIONAL:
        raise ModuleInputError(f"positional must be None, 'rope' or 'alibi', got {positional!r}")
    if positional is not None and (module.bias_k is not None or module.add_zero_attn):
        raise ModuleInputError(
            "positional cannot be combined with add_bias_kv or add_zero_attn (keys without a position)"
        )
    if positional == "rope" and module.head_dim % 2:
        raise ModuleInputError(f"positional='rope' needs an even head dim, got {module.head_dim}")
    if backend is not None:
        get_backend(backend)  # an unknown name fails here, not at the first forward


def _check_batching(
    query: Tensor, key: Tensor, value: Tensor, key_padding_mask, attn_mask, num_heads: int
) -> bool:
    """torch's ``_mha_shape_check`` (same messages): whether the input is batched."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise ModuleTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() == 3:
        if key.dim() != 3 or value.dim() != 3:
            raise ModuleInputError(
                "For batched (3-D) `query`, expected `key` and `value` to be 3-D"
                f" but found {key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != 2:
            raise ModuleInputError(
                "For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D"
                f" but found {key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ModuleInputError(
                "For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                f" but found {attn_mask.dim()}-D tensor instead"
            )
        return True
    if query.dim() == 2:
        if key.dim() != 2 or value.dim() != 2:
            raise ModuleInputError(
                "For unbatched (2-D) `query`, expected `key` and `value` to be 2-D"
                f" but found {key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != 1:
            raise ModuleInputError(
                "For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or 1-D"
                f" but found {key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise ModuleInputError(
                    "For unbatched (2-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                    f" but found {attn_mask.dim()}-D tensor instead"
                )
            expected = (num_heads, query.shape[0], key.shape[0])
            if attn_mask.dim() == 3 and tuple(attn_mask.shape) != expected:
                raise ModuleInputError(
                    f"Expected `attn_mask` shape to be {expected} but got {tuple(attn_mask.shape)}"
                )
        return False
    raise ModuleInputError(
        f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor"
    )


class MultiheadAttention(nn.MultiheadAttention):
    r"""Drop-in for :class:`torch.nn.MultiheadAttention` (and a subclass of it) that runs the fused kernels.

    Same constructor, parameters (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
    ``bias_k``, ``bias_v``, ``out_proj``) and state_dict, so state_dicts load both ways; same
    ``forward`` and return values. Shapes: ``query`` ``(L, N, E)`` (``(N, L, E)`` with
    ``batch_first=True``, ``(L, E)`` unbatched), ``key`` / ``value`` ``(S, N, kdim / vdim)`` likewise.

    Masks follow torch.nn's convention, which differs from SDPA's:

    - ``key_padding_mask`` ``(N, S)`` (``(S,)`` unbatched) and ``attn_mask`` ``(L, S)`` or
      ``(N * num_heads, L, S)``: bool True = IGNORE that key; float masks are added to the scores.
      Mixed bool/float types are accepted with torch's deprecation warning, as torch combines them.
    - ``is_causal`` is torch's hint that ``attn_mask`` is the causal mask; as in torch it requires
      ``attn_mask``. The mask is then applied as the (top-left) causal rule instead of being read,
      which lets the kernel skip the hidden half. With ``add_bias_kv`` / ``add_zero_attn`` the hint
      is trusted exactly where torch trusts it (``need_weights=False`` without ``key_padding_mask``).
    - A ``key_padding_mask`` that only pads on the right becomes the kernel's ``key_lengths`` (checked
      on CPU tensors in eager mode); otherwise it is applied as a broadcast ``(N, 1, 1, S)`` mask. No
      ``L x S`` tensor is built unless a non-right-padding ``key_padding_mask`` meets an ``attn_mask``
      (torch adds them into one as well).

    ``need_weights=True`` (torch's default) returns the softmax weights, averaged over heads unless
    ``average_attn_weights=False``: the output comes from the fused kernel, and the weights are rebuilt
    as ``exp(q k^T / sqrt(E) + mask - lse)`` from its log-sum-exp (gradients through them are exact).
    Only dropout in training needs the weights before the output: that case runs the plain softmax
    formula, as torch does (same RNG draws, so ``torch.manual_seed`` reproduces torch's output).
    Rows that see no key give 0 where torch gives NaN.

    Nested tensors (as ``torch.nn.TransformerEncoder`` passes them in inference) are served for
    batch-first self-attention without masks and with ``need_weights=False`` by
    :func:`fused_attention.varlen_attention` on the packed tokens, in training too.

    Extra keyword-only arguments:
        positional: ``None``, ``"rope"`` (rotary embedding of q and k over the full head dim, positions
            from 0; needs ``L == S``) or ``"alibi"`` (ALiBi slopes of ``num_heads`` heads). For new
            models; the state_dict is unchanged (the tables are non-persistent buffers).
        backend: force an attention backend (see :func:`fused_attention.scaled_dot_product_attention`).
        sinks: learned attention sinks (gpt-oss): a float32 parameter ``sinks`` of ``num_heads`` logits,
            zero-initialised, that joins every row's softmax as a key without value (see the ``sinks``
            argument of :func:`fused_attention.scaled_dot_product_attention`); returned weights then sum
            to ``1 - p_sink`` per row. Off (the default) there is no such parameter, so torch's
            state_dicts load as they are.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        positional: str | None = None,
        backend: str | None = None,
        sinks: bool = False,
    ) -> None:
        _check_heads(embed_dim, num_heads)
        super().__init__(
            embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first, device=device,
            dtype=dtype,
        )
        self._init_fused(positional, backend, sinks)

    @classmethod
    def from_torch_(
        cls, module: nn.MultiheadAttention, *, positional: str | None = None, backend: str | None = None,
        sinks: bool = False,
    ) -> MultiheadAttention:
        """Turns ``module`` (a ``torch.nn.MultiheadAttention``) into this class in place and returns it: the
        same object, with the same parameter tensors (optimizers holding them keep working), device,
        dtype, training mode and hooks; ``sinks=True`` adds the zero-initialised sink parameter."""
        if not isinstance(module, nn.MultiheadAttention):
            raise AttentionTypeError(
                f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}"
            )
        _check_options(module, positional, backend)  # before the class changes: a failure leaves it as it was
        _check_sinks_flag(sinks)
        if not isinstance(module, cls):
            module.__class__ = cls
        assert isinstance(module, cls)
        module._init_fused(positional, backend, sinks)
        return module

    def _init_fused(self, positional: str | None, backend: str | None, sinks: bool = False) -> None:
        _check_options(self, positional, backend)
        self.positional, self.backend = positional, backend
        device = self.out_proj.weight.device
        self.sinks = _sink_parameter(sinks, self.num_heads, device)
        self.rotary = RotaryEmbedding(self.head_dim).to(device) if positional == "rope" else None
        self.alibi = ALiBi(self.num_heads).to(device) if positional == "alibi" else None
        if _keep_torch_fast_paths_off not in self._forward_pre_hooks.values():
            self.register_forward_pre_hook(_keep_torch_fast_paths_off)

    def _slopes(self) -> Tensor | None:
        return None if self.alibi is None else self.alibi()

    def _in_projection(
        self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool, shared_kv: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """torch's projections (one matmul for self-attention, two when key is value), as views."""
        embed = self.embed_dim
        bias = self.in_proj_bias
        if self._qkv_same_embed_dim:
            weight = self.in_proj_weight
            if self_attention:
                q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
                return q, k, v
            if shared_kv:
                w_q, w_kv = weight.split([embed, 2 * embed])
                b_q, b_kv = (None, None) if bias is None else bias.split([embed, 2 * embed])
                k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)
                return F.linear(query, w_q, b_q), k, v
            w_q, w_k, w_v = weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _heads(self, t: Tensor, batch_first: bool) -> Tensor:
        """``(N, S, E)`` (or ``(S, N, E)``) to a ``(N, H, S, head_dim)`` view."""
        t = t.unflatten(-1, (self.num_heads, self.head_dim))
        return t.permute(0, 2, 1, 3) if batch_first else t.permute(1, 2, 0, 3)

    def _check_inputs(
        self, query: Tensor, key: Tensor, value: Tensor, batch_first: bool, key_padding_mask, attn_mask
    ) -> None:
        b, s = (0, 1) if batch_first else (1, 0)
        batch, seq_q, seq_k = query.shape[b], query.shape[s], key.shape[s]
        if query.shape[-1] != self.embed_dim:
            raise ModuleInputError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]} (query)"
            )
        if key.shape[b] != batch or value.shape[b] != batch:
            raise ModuleInputError(
                "query, key and value must have the same batch size, got "
                f"{batch}, {key.shape[b]} and {value.shape[b]}"
            )
        if value.shape[s] != seq_k:
            raise ModuleInputError(
                f"key and value must have the same length, got {seq_k} and {value.shape[s]}"
            )
        for name, t, dim in (("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ModuleInputError(
                    f"{name} has {t.shape[-1]} features but this module's {name[0]}dim is {dim}"
                )
        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) != (seq_q, seq_k):
                raise ModuleInputError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(seq_q, seq_k)}."
                )
            if attn_mask.dim() == 3 and tuple(attn_mask.shape) != (batch * self.num_heads, seq_q, seq_k):
                raise ModuleInputError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{(batch * self.num_heads, seq_q, seq_k)}."
                )
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, seq_k):
            raise ModuleInputError(
                f"Expected key_padding_mask of shape {(batch, seq_k)} (batch, source length), got "
                f"{tuple(key_padding_mask.shape)}"
            )
        for name, t in (("key", key), ("value", value), ("key_padding_mask", key_padding_mask),
                        ("attn_mask", attn_mask)):
            if t is not None and t.device != query.device:
                raise ModuleInputError(
                    f"{name} must be on {query.device} (the query's device), got {t.device}"
                )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As :meth:`torch.nn.MultiheadAttention.forward`: returns ``(attn_output, attn_weights)``;
        ``attn_output`` has the query's layout with ``embed_dim`` features, ``attn_weights`` is
        ``(N, L, S)`` averaged over heads or ``(N, num_heads, L, S)`` (no ``N`` unbatched) with
        ``need_weights=True``, else ``None``."""
        if any(isinstance(t, Tensor) and t.is_nested for t in (query, key, value)):
            return self._forward_nested(
                query, key, value, key_padding_mask, need_weights, attn_mask, is_causal
            )
        _check_mask_type(key_padding_mask, "key_padding_mask", attn_mask, "attn_mask")
        _check_mask_type(attn_mask, "attn_mask")
        batched = _check_batching(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if is_causal and attn_mask is None:
            raise ModuleInputError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        self_attention, shared_kv = query is key and key is value, key is value
        if not batched:  # an unbatched input is a batch of one, batch-first
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        batch_first = self.batch_first or not batched
        self._check_inputs(query, key, value, batch_first, key_padding_mask, attn_mask)
        batch, seq_q = query.shape[:2] if batch_first else query.shape[1::-1]

        projected = self._in_projection(query, key, value, self_attention, shared_kv)
        q, k, v = (self._heads(t, batch_first) for t in projected)
        if self.rotary is not None:
            if q.shape[2] != k.shape[2]:
                raise ModuleInputError(
                    f"positional='rope' needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}"
                )
            q, k = self.rotary(q, k)
        extra = 0
        if self.bias_k is not None or self.bias_v is not None:
            if self.bias_k is None or self.bias_v is None:
                raise ModuleInputError("bias_k and bias_v must be set together")
            bias_shape = (1, self.num_heads, 1, self.head_dim)
            k = torch.cat([k, self.bias_k.view(bias_shape).expand(batch, -1, -1, -1)], 2)
            v = torch.cat([v, self.bias_v.view(bias_shape).expand(batch, -1, -1, -1)], 2)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, self.num_heads, 1, self.head_dim)], 2)
            v = torch.cat([v, v.new_zeros(batch, self.num_heads, 1, self.head_dim)], 2)
            extra += 1
        seq_k = k.shape[2]

        # torch trusts the hint only without padding or weights; without extra keys its meaning is the same
        # everywhere (the mask is causal), so we trust it there too.
        causal = is_causal and (extra == 0 or (key_padding_mask is None and not need_weights))
        mask = None
        if attn_mask is not None and not causal:
            mask = _attend(attn_mask)
            if mask.dim() == 3:
                mask = mask.reshape(batch, self.num_heads, seq_q, -1)
            if extra:
                mask = _pad_keys(mask, extra)
        padding, key_lengths = _padding(key_padding_mask, extra)
        mask = _combine(mask, padding, q.dtype)

        dropout_p = self.dropout if self.training else 0.0
        slopes = self._slopes()
        sinks = _sink_logits(self.sinks)
        weights = None
        # Weights that nothing differentiates (inference) or that dropout must perturb are the
        # softmax itself, and out their product with v: one L x S pass fewer than the fused kernel plus
        # rebuilding them from its lse. With gradients, the fused kernel's backward is the cheaper one.
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        # With sinks the weights are the formula's too (rebuilding them from the lse renormalises rows).
        if need_weights and (dropout_p > 0 or not needs_grad or sinks is not None):
            with torch.profiler.record_function("fused_attention::attention_with_weights"):
                scores = _attention_scores(q, k, mask, key_lengths, causal, slopes)
                may_hide_rows = mask is not None or key_lengths is not None or causal
                if sinks is not None:
                    weights = _softmax_with_sinks(scores, sinks).to(q.dtype)
                else:
                    weights = _safe_softmax(scores, may_hide_rows).to(q.dtype)
                if dropout_p > 0:
                    weights = F.dropout(weights, p=dropout_p)
                out = torch.matmul(weights, v)
        else:
            kwargs, kernel_mask = _causal_kwargs(mask, seq_q, seq_k, q.device) if causal else ({}, mask)
            result = scaled_dot_product_attention(
                q, k, v, attn_mask=kernel_mask, dropout_p=dropout_p, key_lengths=key_lengths,
                alibi_slopes=slopes, return_lse=need_weights, sinks=sinks, backend=self.backend, **kwargs,
            )
            if need_weights:
                out, lse = result
                scores = _attention_scores(q, k, mask, key_lengths, causal, slopes)
                weights = _WeightsFromLse.apply(scores, lse)
            else:
                out = result
        if weights is not None:
            weights = (weights.mean(dim=1) if average_attn_weights else weights).to(q.dtype)
            if not batched:
                weights = weights.squeeze(0)

        if batch_first:
            out = out.transpose(1, 2).reshape(batch, seq_q, -1)
        else:
            out = out.permute(2, 0, 1, 3).reshape(seq_q, batch, -1)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return (out if batched else out.squeeze(0)), weights

    def _forward_nested(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask, need_weights: bool, attn_mask,
        is_causal: bool,
    ) -> tuple[Tensor, None]:
        """Nested (jagged or strided) self-attention on the packed tokens, with varlen attention."""
        reasons = [
            why for why, bad in (
                ("query, key and value must be the same tensor (self-attention)",
                 not (query is key and key is value)),
                ("batch_first must be True", not self.batch_first),
                ("masks are not supported with nested tensors (the nesting is the padding)",
                 key_padding_mask is not None or attn_mask is not None or is_causal),
                ("need_weights must be False", need_weights),
                ("add_bias_kv and add_zero_attn are not supported",
                 self.bias_k is not None or self.add_zero_attn),
                ("the packed weights of kdim == vdim == embed_dim are needed", not self._qkv_same_embed_dim),
                ("the input must be (N, *, embed_dim)", query.dim() != 3),
            ) if bad
        ]
        if reasons:
            raise ModuleInputError("nested tensor input to MultiheadAttention: " + "; ".join(reasons))
        if query.layout == torch.jagged:
            tokens, offsets = query.values(), query.offsets()
            lengths = offsets.diff()
        else:
            parts = query.unbind()
            tokens = torch.cat(parts)
            lengths = torch.tensor([p.shape[0] for p in parts], device=tokens.device)
            offsets = F.pad(lengths.cumsum(0), (1, 0))
        if tokens.shape[-1] != self.embed_dim:
            raise ModuleInputError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {tokens.shape[-1]}"
            )
        max_len = int(lengths.max()) if lengths.numel() else 0
        q, k, v = F.linear(tokens, self.in_proj_weight, self.in_proj_bias).unflatten(
            -1, (3, self.num_heads, self.head_dim)
        ).unbind(1)
        if self.rotary is not None:
            cos, sin = self.rotary._tables(max_len)
            q, k = apply_rotary_emb_qk(q, k, cos, sin, cu_seqlens=offsets, max_seqlen=max_len)
        out = varlen_attention(
            q, k, v, offsets, offsets, max_len, max_len, dropout_p=self.dropout if self.training else 0.0,
            alibi_slopes=self._slopes(), sinks=_sink_logits(self.sinks), backend=self.backend,
        )
        out = F.linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias)
        if query.layout == torch.jagged:
            return torch.nested.nested_tensor_from_jagged(out, offsets), None
        return torch.nested.as_nested_tensor(list(out.split(lengths.tolist())), layout=torch.strided), None


# --- SelfAttention ------------------------------------------------------------------------------------


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
            key_lengths=key_lengths, alibi_slopes=None if self.alibi is None else self.alibi(),
            sinks=_sink_logits(self.sinks), backend=self.backend, **kwargs,
        )
        return self.out(out.transpose(1, 2).reshape(batch, seq, self.d_model))


# --- TransformerEncoderLayer ----------------------------------------------------------------------------


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
        _check_heads(d_model, nhead, "d_model")
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
