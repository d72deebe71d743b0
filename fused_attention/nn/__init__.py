"""Drop-in modules: thin holders of parameters and caches whose forward calls one functional."""

from .attention import (
    ModuleInputError,
    ModuleTypeError,
    MultiheadAttention,
    SelfAttention,
    TransformerEncoderLayer,
)
from .positional import ALiBi, PositionalEncoding, RotaryEmbedding

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
