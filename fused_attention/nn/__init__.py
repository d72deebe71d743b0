"""Drop-in modules: thin holders of parameters and caches whose forward calls one functional."""

from .positional import ALiBi, PositionalEncoding, RotaryEmbedding

__all__ = ["ALiBi", "PositionalEncoding", "RotaryEmbedding"]
