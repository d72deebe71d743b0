"""The KV cache's in-place append as a custom op whose schema declares what it writes.

``fused_attention::kvcache_append_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor
pages, Tensor slots) -> ()``: ``torch.compile`` and functionalization see the caches as the op's only
mutated arguments (``opcheck`` checks the declaration against what it does), the new keys and values as
read-only inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("fused_attention::kvcache_append_", mutates_args=("k_cache", "v_cache"))
def kvcache_append_(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, pages: Tensor, slots: Tensor) -> None:
    """Writes ``k`` ``(B, Lnew, Hkv, D)`` and ``v`` ``(B, Lnew, Hkv, Dv)`` into the ``(rows or pages, S or
    page_size, Hkv, D)`` caches: new token ``(b, i)`` goes to ``[pages[b, i], slots[b, i]]``."""
    k_cache.index_put_((pages, slots), k)
    v_cache.index_put_((pages, slots), v)


@kvcache_append_.register_fake
def _(k_cache, v_cache, k, v, pages, slots):
    return None
