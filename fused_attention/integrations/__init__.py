"""Integrations: put the fused kernels into models that already exist.

``patch_model`` swaps ``torch.nn.MultiheadAttention`` for :class:`fused_attention.nn.MultiheadAttention`
in place. Integrations with optional dependencies live in their own submodules and are imported only
when asked for, so ``import fused_attention`` never needs them.
"""

from .patching import patch_model

__all__ = ["patch_model"]
