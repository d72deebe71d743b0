"""Hugging Face: every keyword transformers' models hand our attention function is used or known
harmless; anything else raises ``TypeError`` naming it and the model class (never dropped silently)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fused_attention.integrations import huggingface
from tests.conftest import assert_policy

T = transformers
_DECODER = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
    "vocab_size": 101, "max_position_embeddings": 128, "pad_token_id": 0,
}
_ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 101}

def _gpt_oss_config():
    config = T.GptOssConfig(
        **_DECODER, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    config._experts_implementation = "eager"  # the grouped matmul has no float64
    return config


# (config, model class, generates): the decoder families whose attention call sites the issue lists.
MODELS = {
    "llama": (lambda: T.LlamaConfig(**_DECODER), T.LlamaForCausalLM, True),
    "mistral": (lambda: T.MistralConfig(**_DECODER, sliding_window=4), T.MistralForCausalLM, True),
    "qwen2": (lambda: T.Qwen2Config(**_DECODER), T.Qwen2ForCausalLM, True),
    "qwen3": (lambda: T.Qwen3Config(**_DECODER, head_dim=8), T.Qwen3ForCausalLM, True),
    "gemma2": (lambda: T.Gemma2Config(**_DECODER, head_dim=8, sliding_window=4), T.Gemma2ForCausalLM, True),
    "gemma3": (lambda: T.Gemma3TextConfig(**_DECODER, head_dim=8, sliding_window=4), T.Gemma3ForCausalLM, True),
    "phi3": (lambda: T.Phi3Config(**_DECODER), T.Phi3ForCausalLM, True),
    "gpt2": (lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=128), T.GPT2LMHeadModel, True),
    "gpt_oss": (_gpt_oss_config, T.GptOssForCausalLM, True),
    "bert": (lambda: T.BertConfig(**_ENCODER), T.BertForMaskedLM, False),
    "modernbert": (
        lambda: T.ModernBertConfig(**_ENCODER, local_attention=4, global_attn_every_n_layers=2, pad_token_id=0),
        T.ModernBertForMaskedLM, False,
    ),
    "t5": (
        lambda: T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=101, decoder_start_token_id=0),
        T.T5ForConditionalGeneration, False,
    ),
}


def _build(name: str, impl: str, dtype=torch.float32):
    config_fn, model_cls, _ = MODELS[name]
    torch.manual_seed(0)
    config = config_fn()
    config._attn_implementation = impl
    return model_cls(config).to(dtype).eval()


def _inputs(name: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding: key lengths for decoders, a (B, S) pad mask for encoders
    inputs = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


class _Recorder:
    """Wraps our attention function to record the keywords each model really passes."""

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.seen.update(kwargs)
        return huggingface.fused_attention_forward(module, query, key, value, attention_mask, **kwargs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_keywords_are_used_or_harmless(name):
    """Each family runs (forward, and generate for decoders) with no TypeError and gives eager's logits;
    the keywords it passed are the ones our function names or lists as harmless."""
    recorder = _Recorder()
    T.AttentionInterface.register("fused_attention_recorder", recorder)
    T.masking_utils.AttentionMaskInterface.register("fused_attention_recorder", huggingface.fused_attention_mask)
    inputs = _inputs(name)
    keep = torch.ones(2, 5, dtype=torch.bool) if name == "t5" else inputs["attention_mask"].bool()
    with torch.no_grad():
        ours = _build(name, "fused_attention_recorder")(**inputs).logits
        ref32 = _build(name, "eager")(**inputs).logits
        ref64 = _build(name, "eager", torch.float64)(**inputs).logits
    assert_policy(ours[keep], ref32[keep], ref64[keep], 2, f"{name} logits")
    if MODELS[name][2]:
        model = _build(name, "fused_attention_recorder")
        model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    named = {"dropout", "scaling", "sliding_window", "softcap", "is_causal", "position_bias", "s_aux", "sinks"}
    assert recorder.seen - named <= huggingface._HARMLESS_KWARGS, recorder.seen


def test_made_up_keyword_through_a_model_raises_naming_it_and_the_class():
    model = _build("llama", "fused_attention")
    with pytest.raises(TypeError, match=r"'made_up_option'.*LlamaAttention"):
        model(input_ids=torch.randint(1, 100, (1, 5)), made_up_option=3)


def test_packed_descriptors_without_a_separating_mask_raise():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 6])
    with pytest.raises(TypeError, match="cu_seq_lens_q"):
        huggingface.fused_attention_forward(module, q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    # one sequence per batch row: the descriptors say nothing the call does not already know
    out, _ = huggingface.fused_attention_forward(module, q, q, q, None, cu_seq_lens_q=torch.tensor([0, 6]))
    assert out.shape == (1, 6, 2, 8)


def test_hubert_encoder_hands_return_dict_down_to_the_attention():
    """HuBERT's encoder passes its forward's return_dict on to every attention call: harmless, and it raised
    TypeError before (HubertModel could not run at all); its output is eager's."""
    config = T.HubertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
        conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    model = T.HubertModel(config).eval()
    audio = torch.randn(2, 400, generator=torch.Generator().manual_seed(1))
    outs = {}
    for impl, dtype in (("fused_attention", torch.float32), ("eager", torch.float32), ("eager", torch.float64)):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outs[impl, dtype] = model.to(dtype)(audio.to(dtype)).last_hidden_state
    ours, ref32, ref64 = outs["fused_attention", torch.float32], outs["eager", torch.float32], outs["eager", torch.float64]
    assert_policy(ours, ref32, ref64, 2, "hubert last hidden state")


@pytest.mark.skipif(not hasattr(T, "HYV4ForCausalLM"), reason="this transformers has no DSA model (HY V4)")
def test_sparse_attention_indices_select_the_keys_as_eager_does():
    """DSA models (HY V4, DeepSeek V3.2, GLM-MoE-DSA, ...) hand their indexer's top-k keys to the attention as
    ``indices`` (FlashMLA's input; eager and sdpa turn them into a mask): each query row sees those keys only.
    A TypeError inside the indexer before (a pattern mask), then a refusal of ``indices``; ignoring them would
    give logits 5e-3 to 9e-3 off eager's here. (Its grouped expert products take no float64: eager experts.)"""
    config = T.HYV4ForCausalLM.config_class(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=20,
        intermediate_size=64, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=12, v_head_dim=10, index_topk=4,
    )
    torch.manual_seed(0)
    model = T.HYV4ForCausalLM._from_config(config, experts_implementation="eager").eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    logits = {}
    for impl, dtype in (("fused_attention", torch.float32), ("eager", torch.float32), ("eager", torch.float64)):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl, dtype] = model.to(dtype)(ids, attention_mask=mask).logits
    kept = mask.bool()
    ours, ref32, ref64 = (logits[key][kept] for key in (("fused_attention", torch.float32), ("eager", torch.float32),
                                                        ("eager", torch.float64)))
    assert_policy(ours, ref32, ref64, 2, "HY V4 logits")


def test_sparse_attention_indices_of_the_wrong_shape_are_refused():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="indices must be"):
        huggingface.fused_attention_forward(module, q, q, q, None, indices=torch.zeros(1, 5, 2, dtype=torch.int32))


def test_sparse_attention_indices_of_minus_one_select_nothing():
    """FlashMLA pads short selections with -1: no key (not the last one). Equals an explicit bool mask."""
    module = torch.nn.Module()
    module.is_causal = False
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    indices = torch.tensor([[[0, -1], [1, 2], [3, -1], [-1, 2]]], dtype=torch.int32)
    chosen = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    for row, picks in enumerate(indices[0].tolist()):
        for j in picks:
            if j >= 0:
                chosen[0, 0, row, j] = True
    out, _ = huggingface.fused_attention_forward(module, q, k, v, None, indices=indices)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=chosen).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
