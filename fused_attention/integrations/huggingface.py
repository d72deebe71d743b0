"""Hugging Face transformers integration: ``attn_implementation="fused_attention"``.

Importing this module (or calling :func:`register`) registers the attention function
:func:`fused_attention_forward` with ``transformers.AttentionInterface`` and the mask function
:func:`fused_attention_mask` with ``transformers.masking_utils.AttentionMaskInterface``, both under the
name ``"fused_attention"``. Then::

    import fused_attention.integrations.huggingface  # noqa: F401  (registers)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fused_attention")
    # or, on a model already built:
    model.set_attn_implementation("fused_attention")

transformers is optional: ``import fused_attention`` never imports it, and importing this module
without it raises an ``ImportError`` that says how to install it.

How masks travel (the contract between the two registered functions). The mask function hands over
the pattern and only the part of the mask the attention cannot rebuild from it:

- a :class:`PatternMask` ``(padding, window)`` for a plain causal, bidirectional or sliding-window
  (causal or bidirectional) pattern over aligned positions: ``window`` as ``window_size`` of
  :func:`fused_attention.scaled_dot_product_attention` (``(-1, 0)``: causal, bottom-right aligned, so
  a query at cache position ``p`` sees keys up to ``p``, as in KV-cache decoding; None: every key), and
  ``padding`` None (none), a 1-D integer tensor ``(B,)`` of key lengths (right padding only: no mask
  tensor at all) or a 2-D bool tensor ``(B, S)`` (True = attend) read as a broadcast ``(B, 1, 1, S)``
  mask, never expanded to ``L x S``. The attention follows the pattern, as eager and sdpa follow their
  masks, whatever the calling module's ``is_causal`` or ``sliding_window`` say: some models set those
  apart from their masks (PhiMoE and Qwen2-MoE build sliding-window masks without passing the keyword;
  ALIGN, Splinter and CLAP build bidirectional masks and have no ``is_causal``, which defaults to True).
- a 4-D tensor: a full mask (bool True = attend, or float added to the scores), used as it is and
  holding all the structure (no causal or window flag is added). This is what the mask function builds
  (with transformers' ``sdpa_mask``) for any other pattern (packed sequences, custom ``or``/``and`` mask
  functions, chunked attention, a static cache whose queries are not at its end, masks ``generate``
  builds ahead of the forward, models whose own code reads the mask: Doge, T5Gemma 2, models that hand their mask to an
  inner model: PaliGemma, Molmo2; GIT's eager-only text layers get eager's float mask), and what a user's own 4-D
  mask arrives as.
- ``None`` (a model that builds no mask): causality from ``module.is_causal`` (or the ``is_causal``
  keyword) and the window from the ``sliding_window`` keyword, as transformers' flash-attention does.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

try:
    import transformers
    from transformers import masking_utils
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "fused_attention.integrations.huggingface needs Hugging Face transformers: "
        "pip install 'fused-attention[hf]' (or pip install transformers)"
    ) from error

from ..errors import AttentionArgumentError, AttentionTypeError
from ..functional import scaled_dot_product_attention

__all__ = ["NAME", "PatternMask", "fused_attention_forward", "fused_attention_mask", "register"]

NAME = "fused_attention"


class PatternMask(NamedTuple):
    """A mask as :func:`fused_attention_mask` hands it to :func:`fused_attention_forward` for a pattern the
    attention rebuilds (see the module docstring)."""

    padding: torch.Tensor | None  # None, key lengths (B,), or a (B, S) bool padding mask (True = attend)
    window: tuple[int, int] | None  # window_size: (-1, 0) causal, (w - 1, 0) sliding, None every key


def _closure(function: Any) -> dict[str, Any]:
    cells = getattr(function, "__closure__", None) or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells)))


def _pattern(mask_function: Any) -> tuple[bool, tuple[int, int] | None]:
    """``(recognized, window)``: whether ``mask_function`` is transformers' causal, bidirectional or
    sliding-window one (``sliding_window_causal_mask_function(w)``: query p sees p - w < j <= p;
    ``sliding_window_bidirectional_mask_function(w)``: |p - j| <= w) and its ``window_size``."""
    if mask_function is masking_utils.causal_mask_function:
        return True, (-1, 0)
    if mask_function is masking_utils.bidirectional_mask_function:
        return True, None
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return False, None
    parts = _closure(mask_function).get("mask_functions", ())
    if not (isinstance(parts, tuple) and len(parts) == 2):
        return False, None
    overlay, base = parts
    name = getattr(overlay, "__qualname__", "")
    width = _closure(overlay).get("sliding_window") if callable(overlay) else None
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        return False, None
    if name.startswith("sliding_window_overlay.") and base is masking_utils.causal_mask_function:
        return True, (width - 1, 0)
    if name.startswith("sliding_window_bidirectional_overlay.") and base is masking_utils.bidirectional_mask_function:
        return True, (width, width)
    return False, None


def _built_ahead_for_generate() -> bool:
    """Whether transformers' ``generate`` is building the masks ahead of the forward
    (``prepare_inputs_for_generation`` calling ``create_masks_for_generate``, for compileable caches): it
    hands them to the model as its ``attention_mask``, which reads anything but a tensor (a
    :class:`PatternMask`) as a 2-D padding mask and fails; those are built dense (a 4-D mask passes
    through). Gemma 3 and 4 call ``create_masks_for_generate`` in every forward: not from
    ``prepare_inputs_for_generation``, so theirs keep the cheap form. Looked up on the calling frames, in
    eager mode only (generate builds them so)."""
    if torch.compiler.is_compiling():
        return False
    creating = False
    for frame in _frames_above(sys._getframe(1).f_back, 12):  # from the mask function's caller
        name = frame.f_code.co_name
        creating = creating or name == "create_masks_for_generate"
        if creating and name == "prepare_inputs_for_generation":
            return True
    return False


def _frames_above(frame: Any, limit: int) -> Iterator[Any]:
    """``frame`` and up to ``limit - 1`` of its callers (fewer at the top of the stack)."""
    for _ in range(limit):
        if frame is None:
            return
        yield frame
        frame = frame.f_back


# Models whose own code reads the attention mask as a tensor before the attention function (Doge's dynamic
# mask adds to it; T5Gemma 2's decoder concatenates its self- and cross-attention masks for its merged
# attention; the sparse-attention (DSA) models' indexers select keys from it): they get transformers' dense
# masks, as sdpa does (a PatternMask has no dtype). (The DSA models then pass the selected keys as
# ``indices``: see fused_attention_forward.)
_READ_THE_MASK = frozenset({
    "doge", "t5gemma2_decoder", "deepseek_v32", "glm_moe_dsa", "hy_v4", "hy_v4_vl_text", "axk2",
    "mistral_large4_text", "kolibri1_1", "dots3_note_text",
})
# Models whose text layers are eager-only code that adds the mask to its scores, while their vision tower takes
# any attention implementation (GIT): they get eager's float masks (a dense bool mask there is added as 0/1, and
# lets the text see past its causal mask).
_ADD_THE_MASK = frozenset({"git"})
# Models that build one mask and hand it to an inner model as its attention_mask (PaliGemma and Molmo2, to their
# language model), whose own create_causal_mask returns a 4-D tensor as it is and reads anything else as a 2-D
# padding mask (a PatternMask failed there): they get dense masks. Matched on the model whose forward builds the
# mask: the config it passes is its text config, the inner model's own.
_HAND_THE_MASK_ON = frozenset({"paligemma", "molmo2"})


def _building_model_type() -> str | None:
    """``config.model_type`` of the model whose forward is building the mask: the nearest calling frame whose
    ``self`` is a module with a config (transformers' mask builders and their wrappers are plain functions).
    Looked up in eager mode only (no frames under compile)."""
    if torch.compiler.is_compiling():
        return None
    for frame in _frames_above(sys._getframe(1).f_back, 8):  # from the mask function's caller
        module = frame.f_locals.get("self")
        if isinstance(module, torch.nn.Module) and hasattr(module, "config"):
            return getattr(module.config, "model_type", None)
    return None


def fused_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = masking_utils.causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers mask function for ``"fused_attention"`` (see the module docstring for what it returns).

    Args follow ``transformers.masking_utils.sdpa_mask``: ``attention_mask`` is the 2-D bool padding mask
    ``(B, seen + q_length)`` (True = token), the query sits at positions ``q_offset ..`` and the keys at
    ``kv_offset .. kv_offset + kv_length``. A :class:`PatternMask` (the pattern and the padding) is
    returned when the pattern is one the attention rebuilds; anything else is built densely by ``sdpa_mask``.
    """
    standard, window = _pattern(mask_function)
    # The attention aligns causality and windows bottom-right: query i at key position i + kv_length - q_length.
    aligned = window is None or (isinstance(q_offset, int) and q_offset - kv_offset == kv_length - q_length)
    reads = getattr(kwargs.get("config"), "model_type", None) in _READ_THE_MASK | _ADD_THE_MASK
    if (
        standard and aligned and not kwargs.get("use_vmap", False) and not reads and not _built_ahead_for_generate()
        and _building_model_type() not in _HAND_THE_MASK_ON
    ):
        if attention_mask is None:
            return PatternMask(None, window)
        padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        padding = padding[:, kv_offset : kv_offset + kv_length].to(torch.bool)
        if torch.compiler.is_compiling():  # which kind of padding is in the values: no branch on them in a graph
            return PatternMask(padding, window)
        lengths = padding.sum(-1)
        positions = torch.arange(kv_length, device=padding.device)
        if torch.equal(padding, positions < lengths[:, None]):  # right padding (or none)
            return PatternMask(None if bool((lengths == kv_length).all()) else lengths, window)
        return PatternMask(padding, window)
    dense_kwargs = {k: v for k, v in kwargs.items() if k not in ("allow_is_causal_skip", "allow_is_bidirectional_skip")}
    if getattr(kwargs.get("config"), "model_type", None) in _ADD_THE_MASK:
        return masking_utils.eager_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, **dense_kwargs,
        )
    return masking_utils.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False, **dense_kwargs,
    )


# Keywords transformers' models pass that leave our math unchanged (checked against the attention call
# sites and ``TransformersKwargs`` of transformers 5.24: Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, GPT-2,
# BERT, gpt-oss, ModernBERT, T5). Any other keyword raises: one that changes the math must not be dropped.
_HARMLESS_KWARGS = frozenset(
    {
        "position_ids",  # already applied to q/k (RoPE); packed sequences reach us as the mask built from them
        "use_cache",  # the cache is updated before attention is called
        "output_attentions",  # we return no weights (None), as transformers' sdpa does: warned once
        "output_hidden_states",
        "return_dict",  # HuBERT's encoder hands its forward's keywords down to the attention
        "output_router_logits",  # MoE router outputs (gpt-oss)
        "num_items_in_batch",  # loss normalisation
        "deterministic",  # ModernBERT: flash-attention's deterministic backward; ours is deterministic
        "encoder_hidden_states",  # BERT: keys and values are already projected from it
        "seq_idx",  # state-space layers' packing index; attention gets the packing as its mask
        # flash-attention's packed-sequence descriptors: harmless when the packing came as a mask
        # (checked in _check_kwargs); max lengths only size flash-attention's launch
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
    }
)


_warned_output_attentions = False


def _warn_output_attentions() -> None:
    global _warned_output_attentions
    _warned_output_attentions = True
    warnings.warn(
        "fused_attention returns no attention weights: output_attentions=True gives None for them (as "
        "transformers' sdpa and flash-attention implementations do); use attn_implementation='eager' to get "
        "them",
        UserWarning,
        stacklevel=4,
    )


def _check_kwargs(module: torch.nn.Module, query: torch.Tensor, attention_mask: Any, kwargs: dict[str, Any]) -> None:
    """Raises ``TypeError`` for a keyword that is neither used nor known harmless (see ``_HARMLESS_KWARGS``)."""
    unknown = sorted(set(kwargs) - _HARMLESS_KWARGS)
    if unknown:
        raise AttentionTypeError(
            f"fused_attention (Hugging Face attention function) got keyword(s) {', '.join(map(repr, unknown))} "
            f"from {type(module).__name__} that it does not implement; refusing rather than computing "
            "something else (use attn_implementation='eager' for this model)"
        )
    if kwargs.get("output_attentions") and not _warned_output_attentions:
        _warn_output_attentions()
    cu = kwargs.get("cu_seq_lens_q")
    packed = isinstance(cu, torch.Tensor) and cu.numel() > query.shape[0] + 1
    if packed and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4):
        raise AttentionTypeError(
            f"fused_attention got packed sequences as 'cu_seq_lens_q' from {type(module).__name__} without "
            "a mask that separates them; pass position_ids as well, with use_cache=False (transformers builds "
            "that mask from them only without a cache)"
        )


def _with_selected_keys(mask: torch.Tensor | None, indices: Any, query: torch.Tensor, kv_length: int) -> torch.Tensor:
    """``mask`` (None, or 4-D bool or float) limited to the keys ``indices`` selects per query row."""
    batch, _, q_length, _ = query.shape
    if not isinstance(indices, torch.Tensor) or indices.dim() != 3 or tuple(indices.shape[:2]) != (batch, q_length):
        raise AttentionArgumentError(
            f"indices must be the selected keys' positions, an int tensor (B, L, topk) = ({batch}, {q_length}, k), "
            f"got {tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__}"
        )
    valid = indices >= 0  # FlashMLA's -1: no key; counted, not scattered, so that order never matters
    counts = torch.zeros(batch, q_length, kv_length, dtype=torch.int32, device=query.device)
    chosen = counts.scatter_add_(-1, indices.long().clamp_min(0), valid.int()).gt(0)[:, None]
    if mask is None:
        return chosen
    if mask.dtype == torch.bool:
        return mask & chosen
    return torch.where(chosen, mask, float("-inf"))


def fused_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    s_aux: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for ``"fused_attention"``.

    Args:
        module: the calling attention module; ``module.training`` gates dropout; ``module.is_causal``
            (overridden by ``is_causal``) sets causality when the mask does not say (None).
        query: ``(B, Hq, L, D)``. key, value: ``(B, Hkv, S, D)``; ``Hq`` a multiple of ``Hkv`` (GQA by
            head counts, K and V never repeated).
        attention_mask: what :func:`fused_attention_mask` returned (a :class:`PatternMask` or a full 4-D
            bool/float mask), a user's 4-D mask, or None.
        dropout: attention dropout probability, applied in training mode only.
        scaling: score scale (default ``1 / sqrt(D)``).
        sliding_window: with no mask (None) only: query at position ``p`` sees keys
            ``p - sliding_window < j <= p`` (causal) or ``|p - j| <= sliding_window - 1`` (bidirectional).
        softcap: logit soft-capping (Gemma-2), before masking.
        position_bias: float bias ``(B or 1, Hq or 1, L, S)`` added to the scores (T5 style).
        s_aux, sinks: learned attention-sink logits ``(Hq,)`` (gpt-oss passes ``s_aux``; ``sinks`` is the
            newer name), one per query head, joining each row's softmax denominator (see the ``sinks``
            argument of :func:`fused_attention.scaled_dot_product_attention`); cast to float32 (with
            its gradient) when the model runs in 16-bit.
        indices: sparse attention's selected keys, int ``(B, L, topk)`` (DeepSeek V3.2's and the other DSA
            models' indexers, which hand them to FlashMLA's kernels): each query row sees only those keys,
            within its mask, as transformers' eager and sdpa paths apply them (a mask); -1 entries select
            nothing.
        kwargs: only keywords known not to change the math (``_HARMLESS_KWARGS``: ``position_ids``,
            ``use_cache``, ``output_attentions``, ...); any other raises ``TypeError`` naming it and the
            calling module's class, so a model whose attention needs something we lack never runs wrong.

    Returns:
        ``(attn_output, None)``: ``attn_output`` is ``(B, L, Hq, D)``, contiguous; no attention weights.
    """
    _check_kwargs(module, query, attention_mask, kwargs)
    if s_aux is not None and sinks is not None:
        raise AttentionTypeError(f"fused_attention got both 's_aux' and 'sinks' from {type(module).__name__}")
    sink_logits = s_aux if s_aux is not None else sinks
    if sink_logits is not None and sink_logits.dtype not in (torch.float32, torch.float64):
        sink_logits = sink_logits.float()
    q_length, kv_length = query.shape[2], key.shape[2]
    mask, key_lengths, window = attention_mask, None, None
    if isinstance(mask, PatternMask):  # the mask's own pattern, as eager and sdpa follow theirs
        mask, window = mask
    elif mask is None or mask.dim() < 4:  # no pattern given: the module's flags, bottom-right aligned
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        if sliding_window is not None:
            # the keyword counts the query's own key, as flash-attention's window_size + 1: causal sees
            # p - w < j <= p; bidirectional sees |p - j| <= w - 1 (ModernBERT passes its config's
            # sliding_window + 1 and masks |p - j| <= sliding_window)
            window = (sliding_window - 1, 0) if causal else (sliding_window - 1, sliding_window - 1)
        elif causal:
            window = (-1, 0)
    if mask is not None and mask.dim() == 1:
        mask, key_lengths = None, mask
    elif mask is not None and mask.dim() < 4:
        mask = mask[:, None, None, -kv_length:]
    if window == (-1, 0) and q_length == 1:  # one query row, bottom-right: it sees every key anyway
        window = None
    if indices is not None:
        mask = _with_selected_keys(mask, indices, query, kv_length)
    if position_bias is not None:
        if mask is None:
            mask = position_bias
        elif mask.dtype == torch.bool:
            mask = position_bias.masked_fill(~mask, float("-inf"))
        else:
            mask = position_bias + mask
    out = scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1], window_size=window, softcap=softcap or None,
        key_lengths=key_lengths, sinks=sink_logits,
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Registers ``"fused_attention"`` with transformers' attention and mask interfaces (idempotent)."""
    transformers.AttentionInterface.register(NAME, fused_attention_forward)
    masking_utils.AttentionMaskInterface.register(NAME, fused_attention_mask)


register()
