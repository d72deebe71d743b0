"""fused_attention: fast, memory-lean scaled-dot-product attention for PyTorch.

``import fused_attention`` never needs the compiled extension, Triton or a GPU: what is missing makes a
backend unavailable, with a reason (``python -m fused_attention info``).
"""

from . import _extension
from .diagnostics import info, support_table
from .functional import scaled_dot_product_attention, varlen_attention

__version__ = "0.1.0"
__all__ = ["__version__", "info", "scaled_dot_product_attention", "support_table", "varlen_attention"]

_extension.load_extension()
