"""RoPE frequency tables: ``rotary_cos_sin`` and the context-extension scalings models use today.

Formulas follow the papers and the published model configs: linear position interpolation (Chen et al.
2023), dynamic NTK-aware scaling (as in Hugging Face's ``dynamic`` rope type), Llama 3.1's wavelength-
banded scaling, and YaRN (Peng et al. 2023). Parameters are given as a dict with the same keys as a
Hugging Face ``rope_scaling`` config (``{"rope_type": "llama3", "factor": 8.0, ...}``) or its version 5
``config.rope_parameters`` (which adds ``rope_theta``, the base, and ``rope_type: "default"``), or as a
:class:`RopeScaling`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .argument_checks import check_bool, check_float_dtype, check_number
from .errors import AttentionArgumentError, AttentionTypeError

_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling parameters; unset fields take the defaults of the corresponding method. ``"default"``:
    no scaling (Hugging Face's ``rope_parameters`` of a plain RoPE model)."""

    rope_type: str
    factor: float | None = None  # every type but "default" needs it
    rope_theta: float | None = None  # the base, when given here (Hugging Face's rope_parameters)
    partial_rotary_factor: float = 1.0  # rotary_dim says how many features rotate: only 1.0 is accepted
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn
    truncate: bool = True  # yarn


def as_scaling(scaling: object) -> RopeScaling | None:
    if scaling is None or isinstance(scaling, RopeScaling):
        return scaling
    if not isinstance(scaling, dict):
        raise AttentionTypeError(f"scaling must be a dict, a RopeScaling or None, got {type(scaling).__name__}")
    # None stands for the method's default, as Hugging Face reads it (its configs write beta_fast: None)
    params: dict[str, Any] = {key: value for key, value in scaling.items() if value is not None}
    rope_type = params.pop("rope_type", params.pop("type", None))
    known = set(RopeScaling.__dataclass_fields__) - {"rope_type"}
    unknown = set(params) - known
    if unknown:
        raise AttentionArgumentError(f"scaling has unknown keys {sorted(unknown)} (known: {sorted(known)})")
    return RopeScaling(rope_type=rope_type, **params)


def _check(scaling: RopeScaling) -> None:
    """Every field a real value of its kind (bad ones divided by zero, took logs of negatives or gave
    tables of NaN deep in the formulas)."""
    if scaling.rope_type not in _TYPES:
        raise AttentionArgumentError(f"scaling rope_type must be one of {_TYPES}, got {scaling.rope_type!r}")
    if scaling.rope_theta is not None:
        check_number("scaling rope_theta", scaling.rope_theta, above=1)
    if scaling.partial_rotary_factor != 1.0:
        raise AttentionArgumentError(
            f"scaling partial_rotary_factor {scaling.partial_rotary_factor!r}: pass rotary_dim = int(head_dim * "
            "partial_rotary_factor), the features that rotate, and leave the key out"
        )
    if scaling.rope_type == "default":
        given = [name for name in ("factor", "original_max_position_embeddings") if getattr(scaling, name) is not None]
        if given:
            raise AttentionArgumentError(f"scaling rope_type 'default' takes no {' or '.join(given)}")
        return
    if scaling.factor is None:
        raise AttentionArgumentError(f"scaling of type {scaling.rope_type!r} needs factor")
    check_number("scaling factor", scaling.factor, above=0)
    context = scaling.original_max_position_embeddings
    if scaling.rope_type in ("dynamic", "llama3", "yarn") and context is None:
        raise AttentionArgumentError(
            f"scaling of type {scaling.rope_type!r} needs original_max_position_embeddings"
        )
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise AttentionArgumentError(
            f"scaling original_max_position_embeddings must be a positive int, got {context!r}"
        )
    if scaling.rope_type == "llama3":
        low = check_number("scaling low_freq_factor", scaling.low_freq_factor, above=0)
        high = check_number("scaling high_freq_factor", scaling.high_freq_factor, above=0)
        if not high > low:  # the smooth band divides by their difference
            raise AttentionArgumentError(f"scaling high_freq_factor ({high}) must exceed low_freq_factor ({low})")
    if scaling.rope_type == "yarn":
        check_number("scaling beta_fast", scaling.beta_fast, above=0)
        check_number("scaling beta_slow", scaling.beta_slow, above=0)
        for name in ("mscale", "mscale_all_dim"):
            if getattr(scaling, name) is not None:
                check_number(f"scaling {name}", getattr(scaling, name), above=-math.inf)
        if scaling.attention_factor is not None:
            check_number("scaling attention_factor", scaling.attention_factor, above=0)
        check_bool("scaling truncate", scaling.truncate)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(rotations: float, dim: int, base: float, max_positions: int) -> float:
    """The feature index whose wavelength fits ``rotations`` turns into the original context."""
    return (dim * math.log(max_positions / (rotations * 2 * math.pi))) / (2 * math.log(base))


def inverse_frequencies(
    rotary_dim: int, base: float, scaling: RopeScaling | None, seq_len: int
) -> tuple[torch.Tensor, float]:
    """``(inv_freq (rotary_dim // 2,) float64, attention_factor)`` for a table of ``seq_len`` positions."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    if scaling is None or scaling.rope_type == "default":
        return 1.0 / base**exponents, 1.0
    kind, factor = scaling.rope_type, scaling.factor
    if kind == "linear":
        return 1.0 / base**exponents / factor, 1.0
    original = int(scaling.original_max_position_embeddings or 0)
    if kind == "dynamic":
        # NTK-aware: grow the base once the sequence outgrows the trained context.
        length = max(seq_len, original)
        base = base * ((factor * length / original) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        return 1.0 / base**exponents, 1.0
    inv_freq = 1.0 / base**exponents
    if kind == "llama3":
        low_wavelen = original / scaling.low_freq_factor
        high_wavelen = original / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: interpolate low frequencies, keep high ones, ramp between; scale attention by mscale.
    attention = scaling.attention_factor
    if attention is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention = _yarn_mscale(factor, scaling.mscale) / _yarn_mscale(factor, scaling.mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)
    low = _yarn_correction_dim(scaling.beta_fast, rotary_dim, base, original)
    high = _yarn_correction_dim(scaling.beta_slow, rotary_dim, base, original)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation, attention


def resolved_base(base: float | None, scaling: RopeScaling | None) -> float:
    """``base``, else the scaling's ``rope_theta``, else 10000; checked (and against ``rope_theta``)."""
    theta = None if scaling is None else scaling.rope_theta
    if base is None:
        base = 10000.0 if theta is None else theta
    base = check_number("base", base, above=1)
    if theta is not None and float(theta) != float(base):
        raise AttentionArgumentError(f"base {base!r} differs from scaling's rope_theta {theta!r}")
    return base


def rotary_cos_sin(
    seq_len: int,
    rotary_dim: int,
    *,
    base: float | None = None,
    scaling: RopeScaling | dict | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for positions ``0 .. seq_len - 1``.

    Args:
        seq_len: number of positions (rows).
        rotary_dim: number of rotated features (even); the tables have ``rotary_dim // 2`` columns, one
            per rotated pair, frequency ``base ** (-2i / rotary_dim)`` before scaling.
        base: the RoPE base (theta); default: scaling's ``rope_theta``, else 10000 (a base that differs
            from ``rope_theta`` raises).
        scaling: ``None``, or a dict / :class:`RopeScaling` with ``rope_type`` one of ``"default"`` (no
            scaling), ``"linear"``
            (``factor``), ``"dynamic"`` (``factor``, ``original_max_position_embeddings``; the base
            grows with ``seq_len`` beyond the original context), ``"llama3"`` (``factor``,
            ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``) or
            ``"yarn"`` (``factor``, ``original_max_position_embeddings``, ``beta_fast``,
            ``beta_slow``, ``mscale``, ``mscale_all_dim``, ``attention_factor``); YaRN's attention
            factor multiplies cos and sin, as Hugging Face models apply it.
        dtype, device: of the returned tables (angles are computed in float64).

    Returns:
        ``(cos, sin)``, each ``(seq_len, rotary_dim // 2)``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise AttentionArgumentError(f"seq_len must be a non-negative int, got {seq_len!r}")
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
        raise AttentionArgumentError(f"rotary_dim must be a positive even int, got {rotary_dim!r}")
    check_float_dtype("dtype", dtype)
    params = as_scaling(scaling)
    if params is not None:
        _check(params)
        if params.rope_type == "dynamic" and rotary_dim <= 2:
            raise AttentionArgumentError(f"dynamic scaling needs rotary_dim > 2, got {rotary_dim}")
    base = resolved_base(base, params)
    inv_freq, attention = inverse_frequencies(rotary_dim, float(base), params, seq_len)
    angles = torch.arange(seq_len, dtype=torch.float64).unsqueeze(1) * inv_freq.unsqueeze(0)
    cos, sin = angles.cos() * attention, angles.sin() * attention
    return cos.to(dtype=dtype, device=device), sin.to(dtype=dtype, device=device)

