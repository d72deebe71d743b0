"""Drop-in modules: thin holders of parameters and caches whose forward calls one functional."""

from .checks import ModuleInputError, ModuleTypeError
from .encoder import TransformerEncoderLayer
from .multihead import MultiheadAttention
from .positional import ALiBi, PositionalEncoding, RotaryEmbedding
from .self_attention import SelfAttention

__all__ = [
    "ALiBi",
    "ModuleInputError",
    "ModuleTypeError",
    "MultiheadAttention",
    "PositionalEncoding",
    "RotaryEmbedding",
    "SelfAttention",
    "TransformerEncoderLayer",
]
