"""Checks of single attention arguments: each validates one user argument and names it in its error.

Shared by :mod:`.inputs` (dense calls), :mod:`.varlen_inputs` (packed calls), the KV-cache API and the
merge helpers, so every entry point rejects bad input with the same words.
"""

from __future__ import annotations

import itertools
import math
import numbers
import operator
import os

import torch
from torch._C._functorch import is_functorch_wrapped_tensor
from torch._subclasses.fake_tensor import FakeTensor  # imported by torch itself

from .errors import AttentionArgumentError, AttentionTypeError

_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_WIDEST_WINDOW = 2**62


def content_checks_enabled(t: torch.Tensor) -> bool:
    """Checks of tensor values force a device sync, so off-CPU they run only when asked for. While
    torch.compile or torch.export traces, values are unknown (a check would be a data-dependent branch
    that breaks the graph), so they run in eager mode only; nor are they known to a fake tensor (fake
    mode, shape propagation) or through torch.func's wrappers (vmap cannot read a batched value)."""
    if torch.compiler.is_compiling() or isinstance(t, FakeTensor) or is_functorch_wrapped_tensor(t):
        return False
    return t.device.type == "cpu" or os.environ.get("FUSED_ATTENTION_CHECKS", "0") == "1"


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise AttentionTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise AttentionTypeError(f"{name}: nested tensors are not supported yet; use varlen_attention")
    if t.layout != torch.strided:
        check_dense_tensor(name, t)
    if t.dtype not in _FLOAT_DTYPES:
        raise AttentionTypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )
    return t


def check_qkv_types(
    query: object, key: object, value: object, names: tuple[str, str, str] = ("query", "key", "value")
) -> None:
    """Types, dtypes and devices of q, k, v must agree (torch raises for the same cases). ``names``: the
    caller's argument names (varlen_attention's are q, k, v)."""
    nq, nk, nv = names
    q = _check_tensor(nq, query)
    k = _check_tensor(nk, key)
    v = _check_tensor(nv, value)
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionTypeError(
            f"{nq}, {nk} and {nv} must have the same dtype, got {nq} {q.dtype}, {nk} {k.dtype}, {nv} {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise AttentionArgumentError(
            f"{nq}, {nk} and {nv} must be on the same device, got {nq} {q.device}, {nk} {k.device}, "
            f"{nv} {v.device}"
        )


def _real(name: str, value: object, what: str) -> float:
    """A real number as float: Python's, NumPy's (numbers.Real) or a 0-d real tensor, as torch's SDPA
    takes them; not a bool."""
    if type(value) is float:  # the common case first
        return value
    scalar_tensor = (isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool
                     and not value.is_complex())
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or scalar_tensor):
        raise AttentionTypeError(f"{name} must be {what}, got {type(value).__name__}")
    return float(value)


def check_dropout(dropout_p: object) -> float:
    dropout_p = _real("dropout_p", dropout_p, "a float")
    if not 0.0 <= dropout_p <= 1.0:  # 1: every probability dropped, the output 0 (as torch)
        raise AttentionArgumentError(f"dropout_p must be in [0, 1], got {dropout_p}")
    return dropout_p


def check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    return _real("scale", scale, "a float or None")


def check_window(window_size: object) -> tuple[int, int]:
    if window_size is None:
        return -1, -1
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or any(isinstance(w, bool) or not isinstance(w, int) for w in window_size)
    ):
        raise AttentionTypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise AttentionArgumentError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size}")
    # Wider than any sequence either way. The kernels add positions to the window in int64: the cpu kernel's
    # sums wrapped around for entries near 2**63 (rows lost keys), and wider ints were pybind's TypeError.
    return min(left, _WIDEST_WINDOW), min(right, _WIDEST_WINDOW)


# From these softcaps on, softcap * tanh(x / softcap) is x to the computing type's precision for every
# score but the astronomically large (|x| < 2**52 in float32, 2**485 in double), while the kernels' x / softcap
# (a multiply by 1 / softcap) goes subnormal, flushed to 0, or overflows: float32 calls with softcap 1e37 gave
# every score 0 on the cpu backend, 1e39 NaN on all. Such a softcap caps nothing: the call runs without one.
# 16-bit and float32 inputs compute in float32, float64 ones in double.
_SOFTCAP_NO_EFFECT = 2.0**64
_SOFTCAP_NO_EFFECT_FLOAT64 = 2.0**512


def check_softcap(softcap: object, dtype: torch.dtype | None = None) -> float:
    """Returns 0.0 for 'no softcap' (the value custom-op schemas carry), also for a softcap too large to
    cap any score of ``dtype``'s computation (see ``_SOFTCAP_NO_EFFECT``)."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise AttentionTypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
    # comparisons, not math.isinf: on a traced SymFloat they become guards, math.isinf cannot be traced
    if not (softcap > 0 and softcap != math.inf):  # (> 0 also rules out NaN)
        raise AttentionArgumentError(f"softcap must be a finite float > 0, got {softcap}")
    if softcap >= (_SOFTCAP_NO_EFFECT_FLOAT64 if dtype == torch.float64 else _SOFTCAP_NO_EFFECT):
        return 0.0
    return float(softcap)


def check_dense_tensor(name: str, t: object) -> torch.Tensor:
    """``t`` if it is a dense (strided) tensor: sparse ones reached the ops (the dispatcher's
    NotImplementedError, or a missing storage), naming no argument."""
    if not isinstance(t, torch.Tensor):
        raise AttentionTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise AttentionTypeError(f"{name} must be a dense tensor, got layout {t.layout}")
    return t


def check_alibi(alibi_slopes: object, batch: int, heads: int, device: torch.device) -> torch.Tensor | None:
    """ALiBi slopes: float32 ``(H,)`` or ``(B, H)``; canonical ``(1 or B, H)``."""
    if alibi_slopes is None:
        return None
    check_dense_tensor("alibi_slopes", alibi_slopes)
    if alibi_slopes.dtype != torch.float32:
        raise AttentionTypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != device:
        raise AttentionArgumentError(f"alibi_slopes must be on {device}, got {alibi_slopes.device}")
    shape = tuple(alibi_slopes.shape)
    if shape == (heads,):
        return alibi_slopes.unsqueeze(0)
    if shape == (batch, heads):
        return alibi_slopes
    raise AttentionArgumentError(
        f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}) (query heads), got {shape}"
    )


def check_sinks(sinks: object, heads: int, device: torch.device) -> torch.Tensor | None:
    """Attention sinks: a float32 (or float64) ``(Hq,)`` tensor of per-query-head logits, never +inf/NaN."""
    if sinks is None:
        return None
    check_dense_tensor("sinks", sinks)
    if sinks.dtype not in (torch.float32, torch.float64):
        raise AttentionTypeError(f"sinks must be float32 (or float64), got {sinks.dtype}")
    if sinks.device != device:
        raise AttentionArgumentError(f"sinks must be on {device}, got {sinks.device}")
    if tuple(sinks.shape) != (heads,):
        raise AttentionArgumentError(
            f"sinks must have shape ({heads},) (one logit per query head), got {tuple(sinks.shape)}"
        )
    if content_checks_enabled(sinks) and bool((torch.isnan(sinks) | (sinks == float("inf"))).any()):
        raise AttentionArgumentError("sinks must not be NaN or +inf (-inf turns a sink off)")
    return sinks


def check_number(name: str, value: object, *, above: float) -> float:
    """A finite real number (not a bool) greater than ``above``: scalar parameters of tables and scalings."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AttentionTypeError(f"{name} must be a number, got {type(value).__name__}")
    # comparisons, not math.isfinite (untraceable on a SymFloat); > above rules out NaN and -inf
    if not (value > above and value != math.inf):
        raise AttentionArgumentError(f"{name} must be a finite number > {above:g}, got {value!r}")
    return float(value)


def check_bool(name: str, flag: object) -> bool:
    if not isinstance(flag, bool):
        raise AttentionTypeError(f"{name} must be a bool, got {type(flag).__name__}")
    return flag


def check_float_dtype(name: str, dtype: object) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise AttentionTypeError(f"{name} must be a floating-point torch.dtype or None, got {dtype!r}")


def check_int_vector(name: str, t: object, length: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:  # (the common case without a call)
        check_dense_tensor(name, t)
    if t.dtype not in (torch.int32, torch.int64):
        raise AttentionTypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.device != device:
        raise AttentionArgumentError(f"{name} must be on {device}, got {t.device}")
    if tuple(t.shape) != (length,):
        raise AttentionArgumentError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    return t


def check_key_lengths(key_lengths: object, batch: int, seq_k: int, device: torch.device) -> torch.Tensor | None:
    if key_lengths is None:
        return None
    kl = check_int_vector("key_lengths", key_lengths, batch, device)
    if content_checks_enabled(kl) and kl.numel() and (int(kl.min()) < 0 or int(kl.max()) > seq_k):
        raise AttentionArgumentError(
            f"key_lengths values must be in [0, {seq_k}] (the key length), got {kl.tolist()}"
        )
    return kl


def check_cu_seqlens(name: str, cu: object, total: int, device: torch.device) -> tuple[torch.Tensor, int | None]:
    """``(cu, the longest sequence)``; the length is None where values are not read (see
    :func:`content_checks_enabled`). The values are read once, for both checks."""
    if not isinstance(cu, torch.Tensor):
        check_dense_tensor(name, cu)
    if cu.dim() != 1 or cu.numel() < 1:
        raise AttentionArgumentError(f"{name} must be 1-D with batch + 1 entries, got shape {tuple(cu.shape)}")
    cu = check_int_vector(name, cu, cu.numel(), device)
    if not content_checks_enabled(cu):
        return cu, None
    values = check_cu_values(name, cu.tolist(), total)
    return cu, max((b - a for a, b in itertools.pairwise(values)), default=0)


def check_cu_values(name: str, values: list[int], total: int) -> list[int]:
    """Offsets of packed sequences: from 0, non-decreasing, ending at the packed token count. Ops that
    read the values anyway call it too (under torch.compile the Python-side check cannot run)."""
    if values[0] != 0 or any(b < a for a, b in itertools.pairwise(values)):
        raise AttentionArgumentError(f"{name} must start at 0 and be non-decreasing, got {values}")
    if values[-1] != total:
        raise AttentionArgumentError(f"{name} must end at the number of packed tokens ({total}), got {values[-1]}")
    return values


def int_value(value: object) -> int | torch.SymInt | None:
    """``value`` as an int if it is an integer scalar (Python's, NumPy's, a 0-d integer tensor; not a
    bool), else None. An int comes back as it is: a traced one (a SymInt, which Dynamo shows as an int)
    would be pinned to its value by operator.index, a recompile for every new value."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return value
    scalar_tensor = isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and not scalar_tensor):
        return None
    try:
        return operator.index(value)  # (a 0-d tensor traced by torch.compile: an unbacked SymInt)
    except TypeError:
        return None


def check_at_least(name: str, number: int | torch.SymInt, minimum: int, requirement: str, shown: object) -> None:
    """Raises ``f"{name} must be {requirement}, got {shown!r}"`` unless ``number >= minimum``. While traced,
    ``number`` may be a SymInt: it is asserted with torch._check, not branched on (a branch cannot read an
    unbacked one, a 0-d tensor's value inside the compiled region): a guard, or a runtime assert where
    unbacked, raising torch's error (a message function or another error class is more than torch 2.6's
    Dynamo traces: it refused the whole call)."""
    if torch.compiler.is_compiling() or isinstance(number, torch.SymInt):
        torch._check(number >= minimum)
    elif number < minimum:
        raise AttentionArgumentError(f"{name} must be {requirement}, got {shown!r}")


def check_max_seqlen(name: str, value: object, longest: int | None) -> int | torch.SymInt:
    """``longest``: the longest sequence from :func:`check_cu_seqlens` (None: not checked, as under
    torch.compile, where a traced ``value`` stays symbolic)."""
    # Any integer scalar: code ported from flash_attn passes NumPy ints or 0-d tensors from `.max()`.
    number = int_value(value)
    if number is None:
        raise AttentionArgumentError(f"{name} must be a non-negative int, got {value!r}")
    check_at_least(name, number, 0, "a non-negative int", value)
    if longest is not None and longest > number:
        raise AttentionArgumentError(f"{name}={number} is smaller than the longest sequence")
    return number
