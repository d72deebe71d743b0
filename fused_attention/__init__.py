"""fused_attention: fast, memory-lean scaled-dot-product attention for PyTorch.

``import fused_attention`` never needs the compiled extension, Triton or a GPU: what is missing makes a
backend unavailable, with a reason (``python -m fused_attention info``).
"""

from . import _extension, compile_cache
from ._version import __version__
from .diagnostics import info, support_table
from .functional import scaled_dot_product_attention, varlen_attention
from .integrations import patch_model
from .kvcache import attention_with_kvcache
from .merge import merge_attention_states, merge_attention_states_list
from .position import (
    RopeScaling,
    add_sinusoidal_position_encoding,
    alibi_slopes,
    apply_rotary_emb,
    apply_rotary_emb_qk,
    rotary_cos_sin,
    sinusoidal_position_encoding,
)

__all__ = [
    "RopeScaling",
    "__version__",
    "add_sinusoidal_position_encoding",
    "alibi_slopes",
    "apply_rotary_emb",
    "apply_rotary_emb_qk",
    "attention_with_kvcache",
    "info",
    "merge_attention_states",
    "merge_attention_states_list",
    "patch_model",
    "rotary_cos_sin",
    "scaled_dot_product_attention",
    "sinusoidal_position_encoding",
    "support_table",
    "varlen_attention",
]

_extension.load_extension()
compile_cache.tag_compile_caches()
