"""``patch_model``: every ``torch.nn.MultiheadAttention`` of a model onto the fused kernels, in place."""

from __future__ import annotations

from torch import nn

from ..backends import get_backend
from ..errors import AttentionTypeError
from ..nn.encoder import TransformerEncoderLayer
from ..nn.multihead import MultiheadAttention


def patch_model(model: nn.Module, *, backend: str | None = None) -> int:
    """Makes every ``torch.nn.MultiheadAttention`` in ``model`` a
    :class:`fused_attention.nn.MultiheadAttention`, in place, and returns how many it converted.

    Each module is converted where it stands (the same object changes class), so it keeps its parameter
    tensors (an optimizer built before patching keeps training them), device, dtype, training mode and
    hooks, and every reference to it (shared modules, ``nn.ModuleList`` entries) sees the change. That
    covers the attention inside ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer`` and
    ``nn.Transformer``; ``model`` may itself be a ``MultiheadAttention``. Outputs are unchanged (within
    float rounding), and torch's encoder-layer inference fast path, which would bypass the attention
    module, is kept off so the fused kernel runs in ``eval()`` under ``no_grad`` too. Each
    ``torch.nn.TransformerEncoderLayer`` becomes a :class:`fused_attention.nn.TransformerEncoderLayer`
    the same way (its subclass: same attributes and state_dict), whose feed-forward block fuses the ReLU
    into linear1 in inference, as torch's fast path did; these are not counted.

    Only modules whose class is exactly ``torch.nn.MultiheadAttention`` (or
    ``torch.nn.TransformerEncoderLayer``) are converted: a subclass may override ``forward``, and modules
    already fused are left as they are (not counted; ``backend``, if given, is set on them too). An
    encoder layer whose attention is a user's subclass keeps it, and like the others no longer takes
    torch's inference fast path.

    Args:
        model: any ``nn.Module``.
        backend: force this attention backend in the converted modules (see
            :func:`fused_attention.scaled_dot_product_attention`); ``None`` dispatches automatically.

    Returns:
        The number of modules converted.
    """
    if not isinstance(model, nn.Module):
        raise AttentionTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        get_backend(backend)  # an unknown name fails before anything changes
    converted = 0
    for module in model.modules():  # each module once, even when shared
        if type(module) is nn.MultiheadAttention:
            MultiheadAttention.from_torch_(module, backend=backend)
            converted += 1
        elif type(module) is nn.TransformerEncoderLayer:
            module.__class__ = TransformerEncoderLayer
        elif isinstance(module, MultiheadAttention) and backend is not None:
            module.backend = backend
    return converted
