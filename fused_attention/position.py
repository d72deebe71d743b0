"""Public positional-encoding functions: sinusoidal, RoPE and ALiBi slopes.

Each function validates its arguments once, reduces them to a canonical form (rotary: x ``(B, S, H, D)``
as a view, tables ``(T, R/2)``, int64 positions ``(B, S)``; sinusoidal: x ``(B, S, D)`` as a view) and
dispatches to a backend like attention does (``backend=`` / ``FUSED_ATTENTION_BACKEND``).
"""

from __future__ import annotations

import math

import torch

from .argument_checks import (
    check_bool,
    check_cu_seqlens,
    check_dense_tensor,
    check_float_dtype,
    check_int_vector,
    check_max_seqlen,
    check_number,
    content_checks_enabled,
    int_value,
)
from .backends.positional import POSITION_BACKENDS, PositionBackend, select_position_backend
from .errors import AttentionArgumentError, AttentionTypeError
from .kernels.position_torch import sinusoidal_table
from .ops.eager import has_tangent
from .overlap import share_elements
from .rope_scaling import RopeScaling, rotary_cos_sin

__all__ = [
    "RopeScaling",
    "add_sinusoidal_position_encoding",
    "alibi_slopes",
    "apply_rotary_emb",
    "apply_rotary_emb_qk",
    "rotary_cos_sin",
    "sinusoidal_position_encoding",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LAYOUTS = ("bhsd", "bshd")


def _check_float_tensor(name: str, t: object) -> torch.Tensor:
    check_dense_tensor(name, t)  # sparse: the kernels raised the dispatcher's error, naming no argument
    if t.dtype not in _FLOAT_DTYPES:
        raise AttentionTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


# Positions are angles' multipliers in float64, exact up to 2**53 (and int64 indices well within range).
_MAX_POSITION = 2**53


def _check_int(name: str, value: object, minimum: int = 0, maximum: int = _MAX_POSITION) -> int:
    """An integer scalar (Python's, NumPy's, a 0-d integer tensor) in ``[minimum, maximum]``, as an int."""
    number = int_value(value)
    if number is None or number < minimum or number > maximum:
        raise AttentionArgumentError(f"{name} must be an int in [{minimum}, {maximum}], got {value!r}")
    return number


# --- sinusoidal ---------------------------------------------------------------------------------------


def sinusoidal_position_encoding(
    seq_len: int,
    dim: int,
    *,
    base: float = 10000.0,
    offset: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The classic Transformer table, ``(seq_len, dim)``.

    ``PE[p, 2i] = sin(p / base ** (2i / dim))`` and ``PE[p, 2i + 1] = cos(p / base ** (2i / dim))`` for
    positions ``p = offset .. offset + seq_len - 1``; computed in float64, returned in ``dtype``
    (default: torch's default dtype). ``dim`` must be even.
    """
    seq_len = _check_int("seq_len", seq_len)
    dim = _check_int("dim", dim, 1)
    if dim % 2:
        raise AttentionArgumentError(f"dim must be even (sin/cos pairs), got {dim}")
    offset = _check_int("offset", offset, maximum=_MAX_POSITION - seq_len)
    base = check_number("base", base, above=0)  # base <= 0 gave a table of NaN
    check_float_dtype("dtype", dtype)
    positions = torch.arange(offset, offset + seq_len, dtype=torch.float64)
    table = sinusoidal_table(positions, dim, base, torch.float64)
    return table.to(dtype=dtype or torch.get_default_dtype(), device=device)


def add_sinusoidal_position_encoding(
    x: torch.Tensor,
    *,
    batch_first: bool = False,
    offset: int | torch.Tensor = 0,
    base: float = 10000.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Returns ``x + PE`` without reading a table: sin/cos are computed inside the kernel.

    Args:
        x: ``(S, B, D)`` (sequence-first, as the classic module takes it) or ``(B, S, D)`` with
            ``batch_first=True``; any strides; ``D`` even; float16/bfloat16/float32/float64 (math in
            float32, float64 for float64).
        offset: first position, an int, or an int tensor ``(B,)`` of per-sequence first positions.
        base: the frequency base (10000 in the Transformer paper).
        backend: force a backend (see :func:`fused_attention.scaled_dot_product_attention`).

    The gradient passes straight through to ``x``. The result has the layout of ``x``.
    """
    _check_float_tensor("x", x)
    if x.dim() != 3:
        raise AttentionArgumentError(f"x must be 3-D, (S, B, D) or (B, S, D) with batch_first, got {x.dim()}-D")
    if x.shape[-1] % 2:
        raise AttentionArgumentError(f"x.shape[-1] must be even (sin/cos pairs), got {x.shape[-1]}")
    base = check_number("base", base, above=0)
    check_bool("batch_first", batch_first)
    canonical = x if batch_first else x.transpose(0, 1)
    offsets, first = _sinusoidal_offsets(offset, canonical.shape[0], canonical.shape[1], x.device)
    out = select_position_backend(x, backend).add_sinusoidal(canonical, offsets, first, base)
    return out if batch_first else out.transpose(0, 1)


def _sinusoidal_offsets(
    offset: object, batch: int, seq: int, device: torch.device
) -> tuple[torch.Tensor | None, int]:
    # Positions up to offset + seq - 1 must stay exact in float64 (beyond, neighbours share an angle).
    last = _MAX_POSITION - seq
    if isinstance(offset, torch.Tensor):
        check_int_vector("offset", offset, batch, device)
        if content_checks_enabled(offset) and offset.numel():
            low, high = (int(x) for x in torch.aminmax(offset))
            if low < 0 or high > last:
                raise AttentionArgumentError(f"offset values must be in [0, {last}], got {offset.tolist()}")
        return offset.to(torch.int64), 0
    return None, _check_int("offset", offset, maximum=last)


# --- RoPE ---------------------------------------------------------------------------------------------


def _canonical_tables(cos: object, sin: object, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float_tensor("cos", cos)
    _check_float_tensor("sin", sin)
    assert isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise AttentionArgumentError(
            f"cos and sin must both be (seq_len, rotary_dim / 2), got cos {tuple(cos.shape)} and sin {tuple(sin.shape)}"
        )
    if cos.device != x.device or sin.device != x.device:
        raise AttentionArgumentError(f"cos and sin must be on {x.device}, got {cos.device} and {sin.device}")
    if 2 * cos.shape[1] > x.shape[-1]:
        raise AttentionArgumentError(
            f"rotary_dim = 2 * cos.shape[-1] = {2 * cos.shape[1]} exceeds the head dim {x.shape[-1]}"
        )
    return kernel_tables(cos, sin, x.dtype)


def kernel_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked cos/sin tables as the rotary kernels read them for inputs of ``dtype``: contiguous, float32
    (float64 for float64 inputs)."""
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return cos.to(table_dtype).contiguous(), sin.to(table_dtype).contiguous()


def _canonical_x(name: str, x: object, layout: object, packed: bool) -> torch.Tensor:
    """The ``(B, S, H, D)`` view of ``x``."""
    _check_float_tensor(name, x)
    assert isinstance(x, torch.Tensor)
    if packed:
        if x.dim() != 3:
            raise AttentionArgumentError(f"{name} must be packed (total, H, D) with cu_seqlens, got {x.dim()}-D")
        return x.unsqueeze(0)
    if layout not in _LAYOUTS:
        raise AttentionArgumentError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if x.dim() != 4:
        raise AttentionArgumentError(f"{name} must be 4-D in layout {layout!r}, got {x.dim()}-D")
    return x.transpose(1, 2) if layout == "bhsd" else x


def _positions(
    x4: torch.Tensor, table_len: int, seqlen_offsets: object, position_ids: object, cu_seqlens: object,
    max_seqlen: object,
) -> torch.Tensor:
    """int64 ``(B, S)`` table rows for every token of the canonical x (a broadcast view when it can be)."""
    batch, seq = x4.shape[0], x4.shape[1]
    device = x4.device
    if position_ids is not None:
        if not (isinstance(seqlen_offsets, int) and not isinstance(seqlen_offsets, bool) and seqlen_offsets == 0):
            raise AttentionArgumentError("pass either position_ids or seqlen_offsets, not both")
        if cu_seqlens is not None:
            raise AttentionArgumentError("position_ids cannot be combined with cu_seqlens")
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int32, torch.int64):
            raise AttentionTypeError("position_ids must be an int32/int64 tensor of shape (B, S)")
        if position_ids.device != device:
            raise AttentionArgumentError(f"position_ids must be on {device}, got {position_ids.device}")
        if position_ids.dim() != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
            raise AttentionArgumentError(
                f"position_ids must have shape {_position_shapes(batch, seq)}, got {tuple(position_ids.shape)}"
            )
        positions = position_ids.to(torch.int64).expand(batch, seq)
    else:
        steps, sequence = torch.arange(seq, device=device), None
        if cu_seqlens is not None:
            steps, sequence = _packed_steps(cu_seqlens, max_seqlen, seq, device)
        if isinstance(seqlen_offsets, torch.Tensor):
            num_sequences = batch if cu_seqlens is None else cu_seqlens.numel() - 1
            offsets = check_int_vector("seqlen_offsets", seqlen_offsets, num_sequences, device).to(torch.int64)
            if sequence is None:
                positions = offsets.unsqueeze(1) + steps
            else:
                positions = (offsets[sequence] + steps).unsqueeze(0)
        else:
            first = _check_int("seqlen_offsets", seqlen_offsets)
            positions = (steps + first).unsqueeze(0).expand(batch, seq)
    if content_checks_enabled(positions) and positions.numel() and not torch.compiler.is_compiling():
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high >= table_len:
            source = "position_ids" if position_ids is not None else "seqlen_offsets"
            raise AttentionArgumentError(
                f"{source}: positions {low}..{high} fall outside the cos/sin table of {table_len} rows"
            )
    return positions


def _position_shapes(batch: int, seq: int) -> str:
    return f"({batch}, {seq})" if batch == 1 else f"({batch}, {seq}) or (1, {seq})"


def _packed_steps(
    cu_seqlens: object, max_seqlen: object, total: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position of each packed token within its sequence, the sequence it belongs to)``."""
    cu, longest = check_cu_seqlens("cu_seqlens", cu_seqlens, total, device)
    if max_seqlen is not None:
        check_max_seqlen("max_seqlen", max_seqlen, longest)
    bounds = cu.to(torch.int64)
    tokens = torch.arange(total, device=device)
    sequence = torch.bucketize(tokens, bounds[1:], right=True)
    return tokens - bounds[sequence], sequence


class _RotaryInPlace(torch.autograd.Function):
    """In-place rotation with autograd: the backward rotates the gradient by -theta. The tables get no
    gradient: tables that need one take the torch backend's in-place rotation, which autograd records."""

    @staticmethod
    def forward(ctx, x, layout, packed, cos, sin, positions, interleaved, backend):
        backend.rotary_(_canonical_x("x", x, layout, packed), cos, sin, positions, interleaved, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, positions)
        ctx.options = (layout, packed, interleaved, backend)
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin, positions = ctx.saved_tensors
        layout, packed, interleaved, backend = ctx.options
        out = backend.rotary(_canonical_x("grad", grad, layout, packed), cos, sin, positions, interleaved, True)
        return _from_canonical(out, layout, packed), None, None, None, None, None, None, None


def _from_canonical(out4: torch.Tensor, layout: str, packed: bool) -> torch.Tensor:
    """Undo :func:`_canonical_x`: the result has the caller's shape (and the layout of its input)."""
    if packed:
        return out4.squeeze(0)
    return out4.transpose(1, 2) if layout == "bhsd" else out4


def _check_writable(tensors: list[tuple[str, torch.Tensor]]) -> None:
    """An in-place rotation writes each element once: not through expanded or self-overlapping strides
    (the triton kernel rotated such rows several times; the cpu and torch backends raised their own
    errors), and not through q and k views that share elements (rotated twice on every backend)."""
    if torch.compiler.is_compiling():
        return
    for name, t in tensors:
        if torch._debug_has_internal_overlap(t) == 1:
            raise AttentionArgumentError(
                f"{name}: inplace=True cannot write a tensor whose elements share memory (expanded or "
                f"overlapping strides {t.stride()}); clone() it first"
            )
    if len(tensors) == 2 and share_elements(tensors[0][1], tensors[1][1]):
        # (exactly: views of one fused QKV tensor that interleave without sharing an element are fine)
        raise AttentionArgumentError(
            "q and k are the same memory, in whole or in part: inplace=True would rotate the elements they "
            "share twice; pass views that do not overlap, or clone() one of them"
        )


def _rotate(
    tensors: list[tuple[str, torch.Tensor]], cos, sin, interleaved, seqlen_offsets, position_ids, cu_seqlens,
    max_seqlen, layout, inplace, backend,
) -> list[torch.Tensor]:
    packed = cu_seqlens is not None
    canon = [_canonical_x(name, t, layout, packed) for name, t in tensors]
    first = canon[0]
    for (name, t), c in zip(tensors[1:], canon[1:]):
        if c.shape[:2] != first.shape[:2] or c.shape[-1] != first.shape[-1] or t.dtype != tensors[0][1].dtype:
            raise AttentionArgumentError(
                f"{name} must match {tensors[0][0]} in batch, sequence, head dim and dtype, got "
                f"{tuple(t.shape)} {t.dtype} vs {tuple(tensors[0][1].shape)} {tensors[0][1].dtype}"
            )
        if t.device != tensors[0][1].device:
            raise AttentionArgumentError(f"{name} must be on {tensors[0][1].device}, got {t.device}")
    if not isinstance(interleaved, bool) or not isinstance(inplace, bool):
        raise AttentionTypeError("interleaved and inplace must be bools")
    cos_t, sin_t = _canonical_tables(cos, sin, first)
    positions = _positions(first, cos_t.shape[0], seqlen_offsets, position_ids, cu_seqlens, max_seqlen)
    chosen: PositionBackend = select_position_backend(first, backend)
    tables_need_grad = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    if tables_need_grad and chosen.name != "torch":
        # the cpu and triton kernels give the tables no gradient: differentiable tables (learned or
        # derived frequencies) take the torch backend's autograd math, as every backend's would
        if backend is not None:
            raise AttentionArgumentError(
                f"cos and sin require grad, and the {chosen.name!r} backend's rotary kernels give the tables "
                "no gradient: use backend='torch' (or detach the tables)"
            )
        chosen = POSITION_BACKENDS["torch"]
    if inplace:
        _check_writable(tensors)
        # Under functorch's transforms and forward-mode AD, the out-of-place op's rules and a copy:
        # _RotaryInPlace's forward takes the ctx, which the transforms refuse, the in-place op has no
        # batching rule for vmap, and neither has a forward derivative (dual tensors' tangents went through
        # unrotated, on every backend).
        transformed = torch._C._are_functorch_transforms_active() or has_tangent([t for _, t in tensors])
        for (_, t), c in zip(tensors, canon):
            if transformed:
                t.copy_(_from_canonical(chosen.rotary(c, cos_t, sin_t, positions, interleaved, False), layout, packed))
            elif torch.is_grad_enabled() and t.requires_grad and not tables_need_grad:
                _RotaryInPlace.apply(t, layout, packed, cos_t, sin_t, positions, interleaved, chosen)
            else:  # (with tables that need gradients: the torch backend's, recorded by autograd)
                chosen.rotary_(c, cos_t, sin_t, positions, interleaved, False)
        return [t for _, t in tensors]
    if len(canon) == 2:
        outs = chosen.rotary_qk(canon[0], canon[1], cos_t, sin_t, positions, interleaved, False)
    else:
        outs = [chosen.rotary(canon[0], cos_t, sin_t, positions, interleaved, False)]
    return [_from_canonical(o, layout, packed) for o in outs]


def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool = False,
    seqlen_offsets: int | torch.Tensor = 0,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    layout: str = "bhsd",
    inplace: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Rotary position embedding (RoPE) in one pass over ``x``.

    Args:
        x: ``(B, H, S, D)`` (``layout="bhsd"``, as :func:`scaled_dot_product_attention` takes it),
            ``(B, S, H, D)`` (``layout="bshd"``), or packed ``(total, H, D)`` with ``cu_seqlens``; any
            strides; float16/bfloat16/float32/float64 (math in float32, float64 for float64).
        cos, sin: ``(T, rotary_dim / 2)`` tables (:func:`rotary_cos_sin`); the first
            ``rotary_dim = 2 * cos.shape[-1]`` features are rotated, the rest pass through.
        interleaved: pair features ``(2i, 2i + 1)`` (GPT-J) instead of ``(i, i + rotary_dim / 2)``
            (GPT-NeoX / Llama, the default).
        seqlen_offsets: position of the first token: an int, or an int tensor ``(B,)`` (per sequence,
            for KV-cache decoding). Token ``s`` uses table row ``seqlen_offsets + s``.
        position_ids: explicit int ``(B, S)`` (or ``(1, S)``) table rows, as Hugging Face models pass
            them; exclusive with ``seqlen_offsets``.
        cu_seqlens: int ``(B + 1,)`` sequence starts for packed ``x``; positions restart at each
            sequence (plus its ``seqlen_offsets``). ``max_seqlen``: the longest sequence (checked).
        layout: ``"bhsd"`` or ``"bshd"`` for 4-D ``x``.
        inplace: rotate ``x`` in place and return it (the only mutating form; autograd-aware).
        backend: force a backend (``"triton"``, ``"cuda"``, ``"cpu"``, ``"torch"``).

    Returns:
        The rotated tensor, shaped (and laid out) like ``x``. Its gradient is the rotation by -theta.
    """
    return _rotate(
        [("x", x)], cos, sin, interleaved, seqlen_offsets, position_ids, cu_seqlens, max_seqlen, layout, inplace,
        backend,
    )[0]


def apply_rotary_emb_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool = False,
    seqlen_offsets: int | torch.Tensor = 0,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    layout: str = "bhsd",
    inplace: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rotary_emb` on queries and keys in one launch; ``q`` and ``k`` may have different
    head counts (GQA) but share batch, sequence, head dim and dtype. Returns ``(q_rotated, k_rotated)``."""
    q_out, k_out = _rotate(
        [("q", q), ("k", k)], cos, sin, interleaved, seqlen_offsets, position_ids, cu_seqlens, max_seqlen,
        layout, inplace, backend,
    )
    return q_out, k_out


# --- ALiBi --------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """ALiBi slopes, float32 ``(num_heads,)``, by the paper's rule (Press et al. 2022).

    For ``n`` a power of two the slopes are the geometric sequence ``2 ** (-8 k / n)``, ``k = 1 .. n``.
    Otherwise the ``2 ** floor(log2 n)`` slopes of the nearest smaller power are followed by every other
    slope of the next power, as in the paper's reference implementation's rule.
    """
    num_heads = _check_int("num_heads", num_heads, 1)

    def geometric(n: int) -> list[float]:
        return [2 ** (-8 * k / n) for k in range(1, n + 1)]

    power = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(power) + geometric(2 * power)[0::2][: num_heads - power]
    return torch.tensor(slopes, dtype=torch.float32, device=device)
