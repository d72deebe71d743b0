"""gpt-oss through ``attn_implementation="fused_attention"``: its learned sinks (``s_aux``) reach our
attention, on its alternation of sliding-window and full layers, with GQA; logits, greedy generation and
training gradients equal eager's."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fused_attention.integrations import huggingface
from tests.conftest import assert_policy

NAME = "fused_attention"


def _gpt_oss():
    """2 layers (sliding window 4, then full), 4 query heads over 2 KV heads, sinks drawn from N(0, 2).
    The experts run their eager loop (the grouped matmul has no float64), so the float64 eager model
    is the oracle of the tolerance policy."""
    config = transformers.GptOssConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=64, vocab_size=101, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128, pad_token_id=0,
    )
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


def _inputs(left_padding: bool = True) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (2, 11), generator=gen)
    mask = torch.ones(2, 11, dtype=torch.long)
    if left_padding:
        mask[1, :3] = 0
        ids[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _as(model, impl: str, dtype: torch.dtype, train: bool = False):
    model = copy.deepcopy(model).to(dtype)
    model.set_attn_implementation(impl)
    return model.train(train)


@pytest.mark.parametrize("left_padding", [False, True], ids=["unpadded", "left_padded"])
def test_gpt_oss_logits_equal_eager(left_padding):
    model, inputs = _gpt_oss(), _inputs(left_padding)
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        logits = {
            (impl, dt): _as(model, impl, dt)(**inputs).logits
            for impl, dt in ((NAME, torch.float32), ("eager", torch.float32), ("eager", torch.float64))
        }
    ours, ref32, ref64 = logits[NAME, torch.float32], logits["eager", torch.float32], logits["eager", torch.float64]
    assert_policy(ours[keep], ref32[keep], ref64[keep], 2, "gpt-oss logits")
    # the sinks matter here: without them the logits move far beyond the tolerance
    off = copy.deepcopy(model)
    with torch.no_grad():
        for layer in off.model.layers:
            layer.self_attn.sinks.fill_(float("-inf"))
        no_sinks = _as(off, NAME, torch.float32)(**inputs).logits
    assert (no_sinks[keep] - ref64[keep].float()).abs().max() > 100 * (ref32[keep] - ref64[keep]).abs().max()


def test_gpt_oss_greedy_generate_equals_eager():
    """16 new tokens from a left-padded batch: past the sliding window of 4, through the KV cache."""
    model, inputs = _gpt_oss(), _inputs()
    outs = {}
    for impl in (NAME, "eager"):
        generator = _as(model, impl, torch.float32)
        outs[impl] = generator.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    assert outs[NAME].shape == (2, 11 + 16)
    assert torch.equal(outs[NAME], outs["eager"])


def test_gpt_oss_training_step_sink_gradients_equal_eager():
    """One training step's loss gradients: the sinks' (and every other parameter's) by the policy."""
    model, inputs = _gpt_oss(), _inputs()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    grads = {}
    for impl, dt in ((NAME, torch.float32), ("eager", torch.float32), ("eager", torch.float64)):
        trained = _as(model, impl, dt, train=True)
        trained(**inputs, labels=labels).loss.backward()
        grads[impl, dt] = {n: p.grad for n, p in trained.named_parameters() if p.grad is not None}
    sink_names = [n for n in grads["eager", torch.float64] if n.endswith("self_attn.sinks")]
    assert len(sink_names) == 2
    assert grads[NAME, torch.float32].keys() == grads["eager", torch.float64].keys()
    for name in grads["eager", torch.float64]:
        assert_policy(
            grads[NAME, torch.float32][name], grads["eager", torch.float32][name],
            grads["eager", torch.float64][name], 3, f"grad {name}",
        )


def test_sinks_keyword_is_s_aux_by_its_newer_name():
    module = torch.nn.Module()
    module.is_causal = True
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 6, 8, generator=gen)
    k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(2))
    logits = torch.randn(4, generator=gen, dtype=torch.float64).to(torch.bfloat16)  # a 16-bit model's parameter
    by_s_aux, _ = huggingface.fused_attention_forward(module, q, k, v, None, s_aux=logits)
    by_sinks, _ = huggingface.fused_attention_forward(module, q, k, v, None, sinks=logits)
    assert torch.equal(by_s_aux, by_sinks)
    without, _ = huggingface.fused_attention_forward(module, q, k, v, None)
    assert not torch.allclose(by_s_aux, without)
    with pytest.raises(TypeError, match="both 's_aux' and 'sinks'"):
        huggingface.fused_attention_forward(module, q, k, v, None, s_aux=logits, sinks=logits)


def test_gpt_oss_bfloat16_sinks_get_their_gradient():
    model, inputs = _gpt_oss(), _inputs()
    trained = _as(model, NAME, torch.bfloat16, train=True)
    trained(**inputs, labels=inputs["input_ids"]).loss.backward()
    for layer in trained.model.layers:
        grad = layer.self_attn.sinks.grad
        assert grad is not None and grad.dtype == torch.bfloat16 and torch.isfinite(grad).all() and grad.abs().sum() > 0
