"""fused_attention.patch_model: torch models onto the fused kernels in place, with unchanged answers."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from conftest import assert_policy
from test_nn_attention import randomize_
from torch import nn
from torch.profiler import profile

from fused_attention.integrations import patch_model
from fused_attention.nn import MultiheadAttention

D, HEADS = 16, 4


class Subclassed(nn.MultiheadAttention):
    """A user's subclass may override forward: patch_model leaves it alone."""


class Zoo(nn.Module):
    """Every place torch puts a MultiheadAttention, and one shared instance."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(D, HEADS, 24, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False
        )
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(D, HEADS, 24, dropout=0.0, batch_first=True), 1)
        self.transformer = nn.Transformer(D, 2, 1, 1, 20, dropout=0.0, batch_first=True)
        self.shared = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.cross = nn.ModuleList([self.shared, nn.MultiheadAttention(D, HEADS, kdim=6, vdim=10, batch_first=True)])
        self.custom = Subclassed(D, HEADS, batch_first=True)

    def forward(self, x, memory, side_k, side_v):
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        h = self.encoder(x, mask=causal, is_causal=True)
        h = self.decoder(h, memory)
        h = h + self.transformer(memory, h)
        h = h + self.shared(h, h, h, need_weights=False)[0]
        out, weights = self.cross[1](h, side_k, side_v)
        return h + out + self.custom(h, h, h)[0], weights


def zoo_inputs(gen, dtype=torch.float64):
    return (
        torch.randn(2, 7, D, generator=gen, dtype=dtype),
        torch.randn(2, 5, D, generator=gen, dtype=dtype),
        torch.randn(2, 9, 6, generator=gen, dtype=dtype),
        torch.randn(2, 9, 10, generator=gen, dtype=dtype),
    )


def test_patch_model_in_place_keeps_everything():
    torch.manual_seed(0)
    model = Zoo()
    model.decoder.eval()
    model.transformer.double()
    params = {name: p for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    old_attention = model.encoder.layers[0].self_attn

    assert patch_model(model) == 2 + 2 + 3 + 1 + 1  # encoder, decoder, nn.Transformer, shared once, cross
    assert model.encoder.layers[0].self_attn is old_attention and isinstance(old_attention, MultiheadAttention)
    assert model.cross[0] is model.shared and isinstance(model.shared, MultiheadAttention)
    assert type(model.custom) is Subclassed
    assert all(p is params[name] for name, p in model.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and state.keys() == model.state_dict().keys()
    assert {name: m.training for name, m in model.named_modules() if "rotary" not in name} == modes
    assert model.transformer.encoder.layers[0].self_attn.in_proj_weight.dtype == torch.float64
    assert patch_model(model) == 0  # already ours
    assert patch_model(model.shared, backend="torch") == 0 and model.shared.backend == "torch"
    root = nn.MultiheadAttention(D, HEADS)
    assert patch_model(root) == 1 and isinstance(root, MultiheadAttention)
    restored = pickle.loads(pickle.dumps(model))  # torch.save(model) works too
    assert type(restored.shared) is MultiheadAttention and restored.shared.backend == "torch"


def test_patched_model_gives_the_same_outputs_and_gradients():
    gen = torch.Generator().manual_seed(1)
    ref64 = randomize_(Zoo().double(), gen, 0.2)
    ref_dt = copy.deepcopy(ref64).float()
    ours = copy.deepcopy(ref_dt)
    assert patch_model(ours) == 9
    inputs64 = zoo_inputs(gen)
    results = []
    for model, dtype in ((ours, torch.float32), (ref_dt, torch.float32), (ref64, torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in inputs64]
        out, weights = model(*leaves)
        results.append((model, leaves, out, weights))
    upstream = [torch.randn(results[2][2].shape, generator=gen, dtype=torch.float64),
                torch.randn(results[2][3].shape, generator=gen, dtype=torch.float64)]
    grads = []
    for model, leaves, out, weights in results:
        params = list(model.parameters())
        gs = torch.autograd.grad([out, weights], leaves + params, [u.to(out.dtype) for u in upstream])
        grads.append(gs)
    (_, _, out, w), (_, _, out_dt, w_dt), (_, _, out64, w64) = results
    assert_policy(out, out_dt, out64, 2, "output")
    assert_policy(w, w_dt, w64, 2, "weights")
    names = ["x", "memory", "side_k", "side_v"] + [name for name, _ in ours.named_parameters()]
    for name, g, g_dt, g64 in zip(names, *grads):
        assert_policy(g, g_dt, g64, 3, f"grad {name}")


def _ops(fn):
    with profile() as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


@pytest.mark.parametrize("padding", [False, True], ids=["no_padding", "padding"])
def test_inference_fast_paths_run_our_kernel(padding):
    """eval() + no_grad(): torch's encoder stack would convert padded input to nested tensors and run
    torch._transformer_encoder_layer_fwd, never calling self_attn; after patching our kernel runs."""
    gen = torch.Generator().manual_seed(2)
    layer = randomize_(nn.TransformerEncoderLayer(32, 4, 40, batch_first=True), gen, 0.15)
    models = {dt: nn.TransformerEncoder(copy.deepcopy(layer).to(dt), 2).eval() for dt in (torch.float32, torch.float64)}
    ours = copy.deepcopy(models[torch.float32])
    assert patch_model(ours) == 2
    x = torch.randn(3, 11, 32, generator=gen, dtype=torch.float64)
    mask = torch.arange(11) >= torch.tensor([[11], [4], [8]]) if padding else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The PyTorch API of nested tensors is in prototype stage")
        want64 = models[torch.float64](x, src_key_padding_mask=mask)
        want, torch_ops = _ops(lambda: models[torch.float32](x.float(), src_key_padding_mask=mask))
        got, our_ops = _ops(lambda: ours(x.float(), src_key_padding_mask=mask))
    assert "aten::_transformer_encoder_layer_fwd" in torch_ops  # the fast path the test is about
    assert "aten::_transformer_encoder_layer_fwd" not in our_ops
    assert any(name.startswith("fused_attention") for name in our_ops), our_ops
    assert not got.is_nested and not want.is_nested
    assert_policy(got, want, want64, 2, "output")  # padded positions are 0 in all three


def test_patched_standalone_attention_in_inference():
    gen = torch.Generator().manual_seed(3)
    ref = randomize_(nn.MultiheadAttention(32, 4, batch_first=True), gen, 0.2).eval()
    ours = copy.deepcopy(ref)
    patch_model(ours)
    x = torch.randn(2, 9, 32, generator=gen)
    with torch.no_grad():
        (want, want_w), torch_ops = _ops(lambda: ref(x, x, x))
        (got, got_w), our_ops = _ops(lambda: ours(x, x, x))
    assert "aten::_native_multi_head_attention" in torch_ops
    assert any(name.startswith("fused_attention") for name in our_ops)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=2e-6)


def test_optimizer_built_before_patching_keeps_training():
    torch.manual_seed(4)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, HEADS, 24, dropout=0.1, batch_first=True), 1,
                                  enable_nested_tensor=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    patch_model(model)
    weight = model.layers[0].self_attn.in_proj_weight
    before = weight.detach().clone()
    model(torch.randn(2, 5, D)).square().mean().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(before, weight.detach())


def test_patch_model_forwards_the_backend_to_every_converted_module():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, HEADS, 24, batch_first=True), 2,
                                  enable_nested_tensor=False)
    assert patch_model(model, backend="torch") == 2
    assert [layer.self_attn.backend for layer in model.layers] == ["torch", "torch"]
    plain = nn.TransformerEncoderLayer(D, HEADS, 24, batch_first=True)
    assert patch_model(plain) == 1 and plain.self_attn.backend is None  # automatic dispatch


def test_patch_model_bad_input_and_compile():
    with pytest.raises(TypeError, match="model"):
        patch_model("not a module")  # type: ignore[arg-type]
    layer = nn.TransformerEncoderLayer(D, HEADS, 24, dropout=0.0, batch_first=True)
    with pytest.raises(ValueError, match="backend"):
        patch_model(layer, backend="nope")
    ref = copy.deepcopy(layer)
    assert patch_model(layer, backend="torch") == 1
    x = torch.randn(2, 6, D)
    padding = torch.arange(6) >= torch.tensor([[6], [3]])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, src_key_padding_mask=padding), ref(x, src_key_padding_mask=padding),
                               rtol=0, atol=2e-6)
