"""Merging partial attention results through their log-sum-exp: the shared :mod:`fused_attention.merge`.

``merge_attention_states(outs, lses)`` here is :func:`fused_attention.merge_attention_states_list`.
"""

from __future__ import annotations

from ..merge import accumulation_dtype, fold_sinks_, merge_into_
from ..merge import merge_attention_states_list as merge_attention_states

__all__ = ["accumulation_dtype", "fold_sinks_", "merge_attention_states", "merge_into_"]
