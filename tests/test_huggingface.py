"""Hugging Face transformers integration: tiny models built from configs (no downloads) give eager's
answers within the tolerance policy, with padding, GQA, KV-cache generation, softcap and windows."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fused_attention.integrations import huggingface
from tests.conftest import assert_policy

NAME = "fused_attention"


def _build(config_cls, model_cls, seed=0, **config):
    torch.manual_seed(seed)
    return model_cls(config_cls(**config)).eval()


def _run(model, impl, dtype, inputs, train=False):
    model = copy.deepcopy(model).to(dtype)
    model.set_attn_implementation(impl)
    model.train(train)
    out = model(**inputs)
    return model, out.logits if hasattr(out, "logits") else out.last_hidden_state


def _check_model(model, inputs, keep: torch.Tensor, grads: bool = True) -> None:
    """Output of ours (float32) against eager in float32 and float64 on the kept positions; then the
    gradients of every parameter for one shared upstream gradient (policy factor 3)."""
    results = {}
    for impl, dtype in ((NAME, torch.float32), ("eager", torch.float32), ("eager", torch.float64)):
        results[impl, dtype] = _run(model, impl, dtype, inputs, train=grads)
    outs = {k: v[1] for k, v in results.items()}
    ours, ref_dt, ref64 = outs[NAME, torch.float32], outs["eager", torch.float32], outs["eager", torch.float64]
    assert_policy(ours[keep], ref_dt[keep], ref64[keep], 2, "output")
    if not grads:
        return
    upstream = torch.randn(ref64[keep].shape, dtype=torch.float64)
    named = {}
    for key, (m, out) in results.items():
        (out[keep] * upstream.to(out.dtype)).sum().backward()
        named[key] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert named[NAME, torch.float32].keys() == named["eager", torch.float64].keys()
    for name in named["eager", torch.float64]:
        assert_policy(
            named[NAME, torch.float32][name], named["eager", torch.float32][name],
            named["eager", torch.float64][name], 3, f"grad {name}",
        )


def test_import_fused_attention_does_not_import_transformers():
    code = "import sys, fused_attention; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registered():
    huggingface.register()  # idempotent
    assert transformers.AttentionInterface._global_mapping[NAME] is huggingface.fused_attention_forward
    mapping = transformers.masking_utils.AttentionMaskInterface._global_mapping
    assert mapping[NAME] is huggingface.fused_attention_mask


def test_mask_function_hands_over_the_pattern_and_the_padding_only():
    mu = transformers.masking_utils
    kw = {"batch_size": 2, "q_length": 5, "kv_length": 5}
    full = torch.ones(2, 5, dtype=torch.bool)
    pattern = huggingface.fused_attention_mask(**kw, mask_function=mu.causal_mask_function, attention_mask=full)
    assert pattern == huggingface.PatternMask(None, (-1, 0))
    right = full.clone()
    right[1, 3:] = False
    lengths, window = huggingface.fused_attention_mask(
        **kw, mask_function=mu.bidirectional_mask_function, attention_mask=right)
    assert lengths.tolist() == [5, 3] and window is None
    left = full.clone()
    left[1, :2] = False
    padding, window = huggingface.fused_attention_mask(**kw, attention_mask=left)
    assert padding.shape == (2, 5) and torch.equal(padding, left) and window == (-1, 0)
    sliding = mu.sliding_window_causal_mask_function(3)  # p - 3 < j <= p
    assert huggingface.fused_attention_mask(**kw, mask_function=sliding) == huggingface.PatternMask(None, (2, 0))
    both_sides = mu.sliding_window_bidirectional_mask_function(2)  # |p - j| <= 2
    assert huggingface.fused_attention_mask(**kw, mask_function=both_sides) == huggingface.PatternMask(None, (2, 2))
    # bidirectional ignores positions: queries not at the keys' end keep the pattern (cross-attention)
    cross = huggingface.fused_attention_mask(batch_size=2, q_length=3, kv_length=5,
                                             mask_function=mu.bidirectional_mask_function, attention_mask=right)
    assert cross.padding.tolist() == [5, 3] and cross.window is None
    # anything it cannot express (here: a custom overlay; a static cache's queries not at its end) is dense
    custom = mu.and_masks(mu.causal_mask_function, lambda b, h, q, k: k != 1)
    assert huggingface.fused_attention_mask(**kw, mask_function=custom, use_vmap=True).shape == (2, 1, 5, 5)
    static = huggingface.fused_attention_mask(batch_size=2, q_length=3, kv_length=8, attention_mask=full[:, :3])
    assert static.shape == (2, 1, 3, 8)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_bert_padded(padding):
    from transformers import BertConfig, BertModel

    model = _build(
        BertConfig, BertModel, vocab_size=101, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    ids = torch.randint(1, 101, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    if padding == "right":
        mask[1, 7:], mask[2, 2:] = 0, 0
    else:
        mask[1, :4], mask[2, 3:6] = 0, 0
    _check_model(model, {"input_ids": ids, "attention_mask": mask}, mask.bool())


def _llama(**extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {
        "vocab_size": 97, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 64,
    }
    return _build(LlamaConfig, LlamaForCausalLM, **{**config, **extra})


def test_llama_gqa_right_padded():
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    _check_model(_llama(), {"input_ids": ids, "attention_mask": mask}, mask.bool())


def _generate(model, impl, ids, mask=None, new=8):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)


def test_llama_gqa_generate_matches_eager():
    model = _llama().double()
    ids = torch.randint(1, 97, (2, 7))
    assert torch.equal(_generate(model, NAME, ids), _generate(model, "eager", ids))


def test_llama_generate_left_padded_matches_each_sequence_alone():
    # eager gives NaN on a left-padded batch's padding rows, so each row is checked against itself unpadded
    model = _llama().double()
    ids = torch.randint(1, 97, (2, 7))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    batched = _generate(model, NAME, ids, mask)
    for row, start in ((0, 0), (1, 3)):
        alone = _generate(model, "eager", ids[row : row + 1, start:])
        assert torch.equal(batched[row, 7:], alone[0, 7 - start :])


def test_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = _build(
        GPT2Config, GPT2LMHeadModel, vocab_size=89, n_embd=32, n_layer=2, n_head=4, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    ids = torch.randint(0, 89, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 5:] = 0
    _check_model(model, {"input_ids": ids, "attention_mask": mask}, mask.bool())
    double = model.double()
    assert torch.equal(_generate(double, NAME, ids[:1]), _generate(double, "eager", ids[:1]))


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _build(
        Gemma2Config, Gemma2ForCausalLM, vocab_size=83, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
        attn_logit_softcapping=0.5, query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"],
    )


def test_gemma2_softcap_and_window():
    ids = torch.randint(0, 83, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 10:] = 0  # fewer pads than the window: eager in float64 gives NaN on rows that see no key
    _check_model(_gemma2(), {"input_ids": ids, "attention_mask": mask}, mask.bool())


def test_gemma2_generate_past_the_window():
    model = _gemma2().double()
    ids = torch.randint(1, 83, (2, 6))
    assert torch.equal(_generate(model, NAME, ids, new=7), _generate(model, "eager", ids, new=7))


def test_dropout_only_in_training():
    model = _llama(attention_dropout=0.5)
    model.set_attn_implementation(NAME)
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


_DECODER = {"vocab_size": 101, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
_ENCODER = {"vocab_size": 101, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0}
# model -> (config class, model class, config): each one's attention flags disagree with the mask it builds
_FLAGS_APART = {
    # a sliding-window mask, and no sliding_window keyword to the attention
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               {**_DECODER, "sliding_window": 4, "num_local_experts": 2, "num_experts_per_tok": 1}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {**_DECODER, "sliding_window": 4, "use_sliding_window": True, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 32, "num_experts": 2, "num_experts_per_tok": 1,
                   "layer_types": ["sliding_attention"] * 2}),
    # the config's sliding_window as the keyword, and a plain causal mask (eager and sdpa: no window)
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {**_DECODER, "sliding_window": 4, "num_experts": 2,
                                                  "num_experts_per_tok": 1}),
    # a bidirectional mask from a module with no is_causal attribute (transformers defaults it to True)
    "align_text": ("AlignTextConfig", "AlignTextModel", _ENCODER),
}


@pytest.mark.parametrize("name", sorted(_FLAGS_APART))
def test_the_mask_sets_the_pattern_where_the_module_flags_disagree(name):
    """eager and sdpa follow the mask a model builds, and so do we now: PhiMoE and Qwen2-MoE ran with full
    causal attention (their masks slide; logit errors of 0.08-0.13 against eager), OLMoE with a window
    eager does not have (0.15), ALIGN's text encoder causally (0.035)."""
    config_name, model_name, config = _FLAGS_APART[name]
    config_cls, model_cls = getattr(transformers, config_name, None), getattr(transformers, model_name, None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"this transformers has no {model_name}")
    model = _build(config_cls, model_cls, **config)
    ids = torch.randint(1, 101, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    inputs, keep = {"input_ids": ids, "attention_mask": mask}, mask.bool()
    if "experts" not in str(config):
        _check_model(model, inputs, keep)
        return
    # transformers' expert layers take no float64: float32 outputs against eager's, which differ by 1e-7
    with torch.no_grad():
        ours, eager = (_run(model, impl, torch.float32, inputs)[1][keep] for impl in (NAME, "eager"))
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return _build(MistralConfig, MistralForCausalLM, **{**_DECODER, "sliding_window": 4})


def test_static_cache_generate_with_masks_built_ahead():
    """generate builds a compileable cache's masks ahead and hands them back to the model as its
    attention_mask, which takes a tensor only: those are dense (a PatternMask there failed in the
    model's own mask building). A sliding-window model without layer types, left-padded; against sdpa (eager's
    float64 softmax gives NaN on the padding rows, and a padded sequence's tokens then differ)."""
    model = _mistral().double()
    ids = torch.randint(1, 101, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    runs = []
    for impl in (NAME, "sdpa"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                       cache_implementation="static"))
    assert torch.equal(*runs)


def test_masks_are_dense_only_when_generate_builds_them_ahead():
    """generate's prepare_inputs_for_generation -> create_masks_for_generate hands masks back to the model:
    dense. Gemma 3 and 4 call create_masks_for_generate in every forward: those keep the cheap form (they
    were dense every forward)."""
    mu = transformers.masking_utils
    padding = torch.ones(2, 16, dtype=torch.bool)

    def create_masks_for_generate():
        return huggingface.fused_attention_mask(batch_size=2, q_length=16, kv_length=16, attention_mask=padding,
                                                mask_function=mu.causal_mask_function)

    def prepare_inputs_for_generation():
        return create_masks_for_generate()

    assert isinstance(create_masks_for_generate(), huggingface.PatternMask)
    assert prepare_inputs_for_generation().shape == (2, 1, 16, 16)


def test_a_model_that_reads_the_mask_itself():
    """Doge adds its dynamic mask to the attention mask before the attention function: it gets transformers'
    dense masks (a PatternMask has no dtype: AttributeError; the padding-only forms lost the causal structure
    without a word before)."""
    config_cls, model_cls = getattr(transformers, "DogeConfig", None), getattr(transformers, "DogeForCausalLM", None)
    if config_cls is None:
        pytest.skip("this transformers has no Doge")
    model = _build(config_cls, model_cls, vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2).double()
    ids = torch.randint(3, 90, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0
    for inputs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
        logits = {}
        for impl in (NAME, "sdpa"):
            model.set_attn_implementation(impl)
            with torch.no_grad():
                logits[impl] = model(**inputs).logits[mask.bool()]
        torch.testing.assert_close(logits[NAME], logits["sdpa"])


def test_a_model_that_hands_its_mask_to_its_language_model():
    """PaliGemma builds one mask and hands it to its Gemma language model as its attention_mask, whose own
    create_causal_mask takes a 4-D tensor as it is: those masks are dense (a PatternMask there raised
    AttributeError in a text-only forward and in every decoding step after the prefix). Against eager: sdpa
    runs PaliGemma's text-only forward bidirectionally (no mask, and its modules say is_causal=False)."""
    config_cls = getattr(transformers, "PaliGemmaConfig", None)
    if config_cls is None:
        pytest.skip("this transformers has no PaliGemma")
    text = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8}
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 16, "patch_size": 8}
    config = config_cls(text_config=text, vision_config=vision, image_token_index=99, projection_dim=32)
    config.text_config.num_image_tokens = 4
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(config).double().eval()
    ids = torch.randint(3, 90, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 7:] = 0
    prompt = torch.cat([torch.full((2, 4), 99), ids[:, :4]], dim=1)  # four image tokens, then the prefix text
    image = {"pixel_values": torch.randn(2, 3, 16, 16, dtype=torch.float64), "token_type_ids": torch.zeros_like(prompt)}
    logits, tokens = {}, {}
    for impl in (NAME, "eager"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
            tokens[impl] = model.generate(prompt, **image, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(logits[NAME], logits["eager"])
    assert torch.equal(tokens[NAME], tokens["eager"])


def test_a_model_whose_eager_only_layers_add_the_mask():
    """GIT's text layers are eager-only code that adds the mask to its scores (its vision tower takes any
    attention implementation): they get eager's float mask. A dense bool mask was added as 0/1 there and let
    the text see its future tokens (logits 1.6e-3 from eager's on a tiny model)."""
    config_cls = getattr(transformers, "GitConfig", None)
    if config_cls is None:
        pytest.skip("this transformers has no GIT")
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 16, "patch_size": 8}
    model = _build(config_cls, transformers.GitForCausalLM, vision_config=vision, vocab_size=100, hidden_size=32,
                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).double()
    ids = torch.randint(3, 90, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    logits = {}
    for impl in (NAME, "eager"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -7:][mask.bool()]
    torch.testing.assert_close(logits[NAME], logits["eager"])


def test_an_encoder_decoder_that_merges_its_masks():
    """T5Gemma 2's decoder concatenates its self- and cross-attention masks for its merged attention: dense
    masks (a PatternMask there raised TypeError in torch.cat: the model could not run). Against sdpa."""
    config_cls = getattr(transformers, "T5Gemma2Config", None)
    if config_cls is None:
        pytest.skip("this transformers has no T5Gemma 2")
    text = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 12, "intermediate_size": 64, "sliding_window": 4, "vocab_size": 100}
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 16, "patch_size": 8}
    config = config_cls(encoder={"text_config": text, "vision_config": vision}, decoder=text)
    torch.manual_seed(0)
    model = transformers.T5Gemma2ForConditionalGeneration(config).double().eval()
    ids = torch.randint(3, 90, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    logits = {}
    for impl in (NAME, "sdpa"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :6]).logits
    torch.testing.assert_close(logits[NAME], logits["sdpa"])


def test_compiled_fullgraph_with_padding():
    """Under torch.compile(fullgraph=True) the mask function cannot branch on which padding the values
    hold (torch.equal: a data-dependent graph break, an error with fullgraph): it hands the padding over."""
    model = _mistral()
    ids = torch.randint(1, 101, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    model.set_attn_implementation("sdpa")
    try:  # transformers' own model code first: torch 2.6's Dynamo cannot trace its wrappers (co_varnames)
        with torch.no_grad():
            torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, attention_mask=mask)
    except torch._dynamo.exc.Unsupported as error:
        pytest.skip(f"this torch cannot compile the model with fullgraph even with sdpa: {str(error)[:120]}")
    torch._dynamo.reset()
    model.set_attn_implementation(NAME)
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(compiled[mask.bool()], eager[mask.bool()], rtol=1e-5, atol=1e-5)


def test_bidirectional_sliding_window_counts_the_query_itself():
    """A bidirectional module passes flash-attention's window + 1 (ModernBERT: its config's sliding_window
    + 1) and transformers' mask lets position p see |p - j| <= sliding_window: with no 4-D mask the
    function applies the same window (it saw |p - j| <= the keyword, one key too many each side)."""
    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float64) for _ in range(3))
    out = huggingface.fused_attention_forward(module, q, k, v, None, sliding_window=3)[0]
    positions = torch.arange(9)
    mask = (positions[:, None] - positions[None, :]).abs() <= 2
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, expected)


def test_output_attentions_warns_that_no_weights_come_back(monkeypatch):
    """As transformers' sdpa: the weights are None, and the user is told once."""
    monkeypatch.setattr(huggingface, "_warned_output_attentions", False)
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    with pytest.warns(UserWarning, match="output_attentions"):
        _, weights = huggingface.fused_attention_forward(module, q, k, v, None, output_attentions=True)
    assert weights is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        huggingface.fused_attention_forward(module, q, k, v, None, output_attentions=True)


def test_attention_function_applies_dropout_only_while_the_module_trains():
    """The attention function itself gates dropout by ``module.training`` (models that pass their dropout
    ungated, as some do, get no dropout in eval mode)."""
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    module.eval()
    plain = huggingface.fused_attention_forward(module, q, k, v, None, dropout=0.0)[0]
    assert torch.equal(huggingface.fused_attention_forward(module, q, k, v, None, dropout=0.5)[0], plain)
    module.train()
    assert not torch.equal(huggingface.fused_attention_forward(module, q, k, v, None, dropout=0.5)[0], plain)
