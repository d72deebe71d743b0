"""``MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` on the fused kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import get_backend
from ..errors import AttentionArgumentError, AttentionTypeError
from ..functional import scaled_dot_product_attention, varlen_attention
from ..position import apply_rotary_emb_qk
from .checks import _POSITIONAL, ModuleInputError, ModuleTypeError, _check_heads, _keep_torch_fast_paths_off
from .masks import _attend, _attention_scores, _causal_kwargs, _check_mask_type, _combine, _pad_keys, _padding
from .positional import ALiBi, RotaryEmbedding
from .weights import (
    _check_sinks_flag,
    _safe_softmax,
    _sink_logits,
    _sink_parameter,
    _softmax_with_sinks,
    _WeightsFromLse,
)


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
        if isinstance(module, cls):  # already fused: re-initialising would drop its sinks and positional state
            has = (module.positional, module.backend, module.sinks is not None)
            if has != (positional, backend, sinks):
                raise AttentionArgumentError(
                    f"module is already a fused {cls.__name__} with positional={has[0]!r}, backend={has[1]!r}, "
                    f"sinks={has[2]}; from_torch_ would discard that state to make it positional={positional!r}, "
                    f"backend={backend!r}, sinks={sinks} (build a new module to change them)"
                )
            return module
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

    def _slopes(self, device: torch.device) -> Tensor | None:
        return None if self.alibi is None else self.alibi(device)

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
        need_weights = bool(need_weights)  # torch reads it as a truth value (None, 0, NumPy bools)
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
        k, v, extra = self._append_extra_keys(k, v, batch)
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
        slopes = self._slopes(q.device)
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
            out = out.transpose(1, 2).reshape(batch, seq_q, self.embed_dim)  # not -1: no size from 0 elements
        else:
            out = out.permute(2, 0, 1, 3).reshape(seq_q, batch, self.embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return (out if batched else out.squeeze(0)), weights

    def _append_extra_keys(self, k: Tensor, v: Tensor, batch: int) -> tuple[Tensor, Tensor, int]:
        """torch's ``add_bias_kv`` (a learned key/value) and ``add_zero_attn`` (a zero key/value), each
        appended after the keys; returns the new k, v and how many keys were appended."""
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
        return k, v, extra

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
            cos, sin = self.rotary._tables(max_len, q.device)
            q, k = apply_rotary_emb_qk(q, k, cos, sin, cu_seqlens=offsets, max_seqlen=max_len)
        out = varlen_attention(
            q, k, v, offsets, offsets, max_len, max_len, dropout_p=self.dropout if self.training else 0.0,
            alibi_slopes=self._slopes(q.device), sinks=_sink_logits(self.sinks), backend=self.backend,
        )
        out = F.linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias)
        if query.layout == torch.jagged:
            return torch.nested.nested_tensor_from_jagged(out, offsets), None
        return torch.nested.as_nested_tensor(list(out.split(lengths.tolist())), layout=torch.strided), None
