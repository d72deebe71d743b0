"""Positional-encoding modules: the classic sinusoidal ``PositionalEncoding``, ``RotaryEmbedding`` and
``ALiBi``. Each holds its buffers and calls one function of :mod:`fused_attention.position`."""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

from ..argument_checks import int_value
from ..errors import AttentionArgumentError
from ..position import (
    RopeScaling,
    add_sinusoidal_position_encoding,
    alibi_slopes,
    apply_rotary_emb_qk,
    rotary_cos_sin,
)
from ..rope_scaling import as_scaling

# A loaded ``pe`` within this of the formula is the formula (different sin implementations differ by
# an ulp); a trained or edited table differs by far more.
_PE_FORMULA_ATOL = 1e-6


def _classic_table(max_len: int, d_model: int) -> torch.Tensor:
    """The table of the classic module (PyTorch's Transformer tutorial), float32 ``(max_len, 1, d_model)``."""
    position = torch.arange(max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, 1, d_model)
    pe[:, 0, 0::2] = torch.sin(position * div_term)
    pe[:, 0, 1::2] = torch.cos(position * div_term)
    return pe


class PositionalEncoding(nn.Module):
    """Drop-in for the classic sinusoidal ``PositionalEncoding`` (``x + pe[:x.size(0)]``, then dropout).

    Same buffer ``pe`` of shape ``(max_len, 1, d_model)``, so state_dicts load both ways; the forward adds
    the encoding computed inside the kernel (one read and one write of ``x``, no table read). Outputs
    equal the classic module's within float rounding: the classic float32 table is itself off by up to
    about 2e-4 at positions near 5000 (float32 angles); the kernel's encoding is closer to exact. If the
    ``pe`` it holds differs from the formula (loaded from a trained or edited model, or edited in place),
    it adds that stored table instead, so loading never silently changes results.

    The table is compared with the formula when it changes, not on every call, and a change is seen
    through ``pe``'s identity, storage and version counter: ``load_state_dict``, assigning ``module.pe``
    or ``module.pe.data``, and in-place edits of ``pe`` itself (``with torch.no_grad(): module.pe.mul_(2)``)
    are seen. An in-place edit through ``pe.data`` (``module.pe.data.mul_(2)``) is not: ``.data`` is a
    tensor with a version counter of its own, so nothing short of reading the whole table on every call
    would notice, and the module would keep adding the formula. Edit ``pe`` itself, or assign the
    edited table (``module.pe.data = edited``).

    Args:
        d_model: feature size (even).
        max_len: longest sequence; longer inputs raise a ``ValueError``.
        dropout: dropout probability applied after the addition.
        batch_first: inputs are ``(B, S, d_model)`` instead of ``(S, B, d_model)``.
    """

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        width, length = int_value(d_model), int_value(max_len)
        if width is None or width <= 0 or width % 2:
            raise AttentionArgumentError(f"d_model must be a positive even int (sin/cos pairs), got {d_model!r}")
        if length is None or length < 0:
            raise AttentionArgumentError(f"max_len must be a non-negative int, got {max_len!r}")
        d_model, max_len = width, length
        self.dropout = nn.Dropout(p=dropout)
        self.batch_first = batch_first
        self.register_buffer("pe", _classic_table(max_len, d_model))
        self._formula_version: tuple[int, int, int] | None = self._version_key()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._check_formula())

    def _version_key(self) -> tuple[int, int, int]:
        # (the storage too: ``pe.data = other`` keeps the tensor and its version counter)
        return id(self.pe), self.pe._version, self.pe.data_ptr()

    def _check_formula(self) -> None:
        formula = _classic_table(self.pe.shape[0], self.pe.shape[2]).to(self.pe.device)
        same = torch.allclose(self.pe.float(), formula, rtol=0.0, atol=_PE_FORMULA_ATOL)
        self._formula_version = self._version_key() if same else None

    def uses_formula(self) -> bool:
        """Whether the forward computes the encoding in the kernel (``pe`` is the formula's table)."""
        if not torch.compiler.is_compiling() and self._version_key() != self._formula_version:
            self._check_formula()  # pe was replaced or edited in place since it was last checked
        return self._formula_version is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.pe.shape[-1]:  # (the formula path would fit any even width)
            raise AttentionArgumentError(
                f"x must be (seq, batch, d_model) or (batch, seq, d_model) with d_model={self.pe.shape[-1]}, "
                f"got shape {tuple(x.shape)}"
            )
        seq_len = x.size(1 if self.batch_first else 0)
        if seq_len > self.pe.shape[0]:
            raise AttentionArgumentError(
                f"x has {seq_len} positions but this PositionalEncoding holds max_len={self.pe.shape[0]}"
            )
        if self.uses_formula():
            if x.is_floating_point():  # the classic module's ``x + pe`` promotes (bfloat16 x, float32 pe: float32)
                x = x.to(torch.promote_types(x.dtype, self.pe.dtype))
            out = add_sinusoidal_position_encoding(x, batch_first=self.batch_first)
        else:
            table = self.pe[:seq_len]
            out = x + (table.transpose(0, 1) if self.batch_first else table)
        return self.dropout(out)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a float32 cos/sin cache.

    The cache lives in non-persistent buffers (moved with the module, kept in float32 when the module is
    cast), is grown on demand for longer sequences (under a lock, so threads may share the module), and
    is applied to q and k in one launch of :func:`fused_attention.apply_rotary_emb_qk`. Under
    ``torch.compile`` the cache cannot grow: size it up front with ``max_seq_len``. With ``dynamic``
    (NTK) scaling the frequencies depend on the sequence length itself, so the table is rebuilt for
    ``max(positions needed, original_max_position_embeddings)`` whenever that changes: a function of the
    call alone. (Hugging Face keeps the longest length seen until a sequence shorter than the original
    context comes: the two agree while a sequence grows, as in generation, and differ for a shorter
    sequence after a longer one.) ``max_seq_len`` is then unused; under ``torch.compile`` the table built
    last (in eager mode) is used, the original context's if none was.

    Args:
        dim: rotary dim (even); features beyond it pass through.
        base: RoPE base (theta); default: the scaling's ``rope_theta`` (Hugging Face's ``rope_parameters``),
            else 10000.
        interleaved: GPT-J pairing instead of GPT-NeoX/Llama's half split.
        scaling: RoPE scaling (see :func:`fused_attention.rotary_cos_sin`).
        max_seq_len: positions cached up front.
    """

    cos_cached: torch.Tensor
    sin_cached: torch.Tensor

    def __init__(
        self,
        dim: int,
        *,
        base: float | None = None,
        interleaved: bool = False,
        scaling: RopeScaling | dict | None = None,
        max_seq_len: int = 2048,
    ):
        super().__init__()
        self.dim, self.base, self.interleaved, self.scaling = dim, base, interleaved, scaling
        self._lock = threading.Lock()
        # Dynamic NTK's frequencies depend on the sequence length itself (the base grows past the
        # original context), so its table is always built for exactly max(needed, original) positions.
        parsed = as_scaling(scaling)
        self._dynamic_context = (
            int(parsed.original_max_position_embeddings or 0) if parsed and parsed.rope_type == "dynamic" else None
        )
        if self._dynamic_context is not None:
            max_seq_len = self._dynamic_context
        cos, sin = rotary_cos_sin(max_seq_len, dim, base=base, scaling=scaling)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]  # a lock cannot be copied or pickled (nn.TransformerEncoder deep-copies layers)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _apply(self, fn, recurse=True):
        was_meta = self.cos_cached.is_meta
        module = super()._apply(fn, recurse)
        # Casting the module must not round the tables, and tables leaving the meta device (a model built
        # there, then ``to_empty``) hold no values; ``load_state_dict`` cannot restore non-persistent buffers.
        if self.cos_cached.dtype != torch.float32 or (was_meta and not self.cos_cached.is_meta):
            self._rebuild(self.cos_cached.shape[0], self.cos_cached.device)
        return module

    def _rebuild(self, length: int, device: torch.device) -> None:
        cos, sin = rotary_cos_sin(length, self.dim, base=self.base, scaling=self.scaling, device=device)
        self.cos_cached, self.sin_cached = cos, sin

    def _tables(self, needed: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            return self.cos_cached, self.sin_cached
        # The pair is read under the lock too: read between a rebuild's two assignments, it was a new cos
        # with an old sin (a shape error in another thread, or dynamic NTK's tables of two lengths).
        with self._lock:
            if self.cos_cached.is_meta and device is not None and device.type != "meta":
                # Built on the meta device and loaded with load_state_dict(assign=True): no state_dict
                # holds the tables, and nothing moved them off the meta device. Built where the inputs are.
                self._rebuild(self.cos_cached.shape[0], device)
            cos, sin = self.cos_cached, self.sin_cached
            if self._dynamic_context is not None:
                length = max(needed, self._dynamic_context)
                if length != cos.shape[0]:
                    cos, sin = rotary_cos_sin(length, self.dim, base=self.base, scaling=self.scaling,
                                              device=cos.device)
                    self.cos_cached, self.sin_cached = cos, sin
                return cos, sin
            if needed > cos.shape[0]:
                self._rebuild(max(needed, 2 * cos.shape[0]), cos.device)
                cos, sin = self.cos_cached, self.sin_cached
            return cos, sin

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        seqlen_offset: int | torch.Tensor = 0,
        position_ids: torch.Tensor | None = None,
        layout: str = "bhsd",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(q, k)`` rotated; layouts as :func:`fused_attention.apply_rotary_emb`."""
        seq_len = q.shape[2] if layout == "bhsd" else q.shape[1]
        if torch.compiler.is_compiling():
            needed = 0
        elif position_ids is not None:
            needed = int(position_ids.max()) + 1 if position_ids.numel() else 0
        elif isinstance(seqlen_offset, torch.Tensor):
            needed = (int(seqlen_offset.max()) if seqlen_offset.numel() else 0) + seq_len
        else:
            needed = seqlen_offset + seq_len
        cos, sin = self._tables(needed, q.device)
        return apply_rotary_emb_qk(
            q, k, cos, sin, interleaved=self.interleaved, seqlen_offsets=seqlen_offset, position_ids=position_ids,
            layout=layout,
        )


class ALiBi(nn.Module):
    """Holds the ALiBi slopes of ``num_heads`` heads (float32, non-persistent, moved with the module);
    ``forward()`` returns them, ready for ``scaled_dot_product_attention(alibi_slopes=...)``.
    ``forward(device)``: slopes still on the meta device (the module built there, then loaded with
    ``load_state_dict(assign=True)``, which cannot restore them) are computed on ``device`` first."""

    slopes: torch.Tensor

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    def _apply(self, fn, recurse=True):
        was_meta = self.slopes.is_meta
        module = super()._apply(fn, recurse)
        # The kernels take float32 slopes; slopes leaving the meta device (``to_empty``) hold no values.
        if self.slopes.dtype != torch.float32 or (was_meta and not self.slopes.is_meta):
            self.slopes = alibi_slopes(self.num_heads, device=self.slopes.device)
        return module

    def forward(self, device: torch.device | str | None = None) -> torch.Tensor:
        if self.slopes.is_meta and device is not None and torch.device(device).type != "meta":
            self.slopes = alibi_slopes(self.num_heads, device=device)
        return self.slopes
