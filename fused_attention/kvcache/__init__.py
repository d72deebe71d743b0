"""Attention with a KV cache: in-place append (with RoPE), contiguous and paged caches, split-KV.

- :func:`attention_with_kvcache`: FlashAttention's ``flash_attn_with_kvcache`` on every backend.
- :class:`PagedKVCache`, :class:`StaticKVCache`: caches that own their storage and bookkeeping.
"""

from .attention import attention_with_kvcache
from .cache import PagedKVCache, StaticKVCache

__all__ = ["PagedKVCache", "StaticKVCache", "attention_with_kvcache"]
