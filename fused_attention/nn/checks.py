"""Errors and argument checks shared by the attention modules: torch's exception classes and rules."""

from __future__ import annotations

from torch import nn

from ..errors import AttentionArgumentError, AttentionTypeError

_POSITIONAL = (None, "rope", "alibi")


class ModuleInputError(AttentionArgumentError, AssertionError):
    """Bad input to an attention module: a ``ValueError`` that is also a ``RuntimeError`` and an
    ``AssertionError``, the classes torch's modules raise for the same mistakes, so ``except`` clauses
    written for torch keep working."""


class ModuleTypeError(AttentionTypeError, AssertionError):
    """Bad type or dtype given to an attention module (a ``TypeError``, ``RuntimeError`` and
    ``AssertionError``)."""


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    return len(shape) <= len(target) and all(d in (1, t) for d, t in zip(reversed(shape), reversed(target)))


def _check_heads(
    embed_dim: int, num_heads: int, name: str = "embed_dim", heads_name: str = "num_heads"
) -> None:
    positive = isinstance(embed_dim, int) and isinstance(num_heads, int) and embed_dim > 0 and num_heads > 0
    if positive and embed_dim % num_heads:
        raise ModuleInputError(f"{name} ({embed_dim}) must be divisible by {heads_name} ({num_heads})")


def _keep_torch_fast_paths_off(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook. ``torch.nn.TransformerEncoderLayer``'s inference fast path calls
    ``torch._transformer_encoder_layer_fwd`` on its ``self_attn``'s weights and never calls
    ``self_attn``; torch skips that path while any submodule has a hook, so this keeps our kernel in the
    loop however the layer is built (ours, patched, or a user's subclass)."""
