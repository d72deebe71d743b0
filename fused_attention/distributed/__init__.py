"""Context parallelism over ``torch.distributed``: attention over a sequence sharded across ranks.

- :func:`ring_attention`: key/value shards travel around a ring (zig-zag or contiguous layout).
- :func:`ulysses_attention`: all-to-all from sequence shards to head shards and back.
- :func:`shard_sequence` / :func:`unshard_sequence`: move between whole sequences and shards.
- :func:`merge_attention_states`: combine partial attention results through their log-sum-exp.

Works with gloo (CPU tensors) and NCCL (CUDA tensors) process groups; the per-rank attention runs on
:func:`fused_attention.scaled_dot_product_attention` (any of our backends).
"""

from .attention import ring_attention, ulysses_attention
from .layout import shard_sequence, unshard_sequence
from .merge import merge_attention_states

__all__ = ["merge_attention_states", "ring_attention", "shard_sequence", "ulysses_attention", "unshard_sequence"]
