"""TransformerEncoderLayer's feed-forward block: in inference the ReLU fused into linear1 where nothing
can tell, torch's computation everywhere else; patch_model's encoder layers get it too."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_policy
from test_nn_attention import compare, randomize_, reference_trio
from torch import nn
from torch.profiler import profile

from fused_attention.integrations import patch_model
from fused_attention.nn import TransformerEncoderLayer

E, H, FF = 16, 4, 40


def _op_names(fn):
    with profile() as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


def _layers(activation="relu", gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    kwargs = {"dim_feedforward": FF, "dropout": 0.0, "batch_first": True, "activation": activation}
    return reference_trio(nn.TransformerEncoderLayer, TransformerEncoderLayer, (E, H), kwargs, torch.float32, gen), gen


def test_inference_fuses_linear1_and_relu():
    (ours, ref_dt, ref64), gen = _layers()
    x64 = torch.randn(3, 9, E, generator=gen, dtype=torch.float64)
    for m in (ours, ref_dt, ref64):
        m.eval()
    with torch.no_grad():
        got, names = _op_names(lambda: ours(x64.float()))
        want = ref_dt.norm2(_residual(ref_dt, x64.float()))  # torch's slow path (its fast path rounds otherwise)
        want64 = ref64.norm2(_residual(ref64, x64))
    assert "aten::_addmm_activation" in names, names
    assert not {"aten::relu", "aten::clamp_min"} & names, names  # no fresh tensor for the ReLU
    assert_policy(got, want, want64, 2, "output")


def _residual(layer, x):
    """torch's post-norm slow path up to norm2's input."""
    x = layer.norm1(x + layer._sa_block(x, None, None))
    return x + nn.TransformerEncoderLayer._ff_block(layer, x)


def test_training_runs_torch_block():
    (ours, ref_dt, ref64), gen = _layers(gen_seed=1)
    inputs = {"src": torch.randn(2, 7, E, generator=gen, dtype=torch.float64)}
    compare(lambda m, t: (m(t["src"]),), (ours, ref_dt, ref64), torch.float32, inputs)
    x = torch.randn(2, 7, E, requires_grad=True)
    _, names = _op_names(lambda: ours(x))
    assert "aten::relu" in names and "aten::_addmm_activation" not in names, names


class _Scaled(nn.Linear):
    """A subclass may compute anything: the block must call it."""

    def forward(self, x):
        return super().forward(x) * 2.0


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("case", ["hook", "pre_hook", "act_hook", "subclass", "gelu", "custom", "autocast"])
def test_torch_computation_wherever_the_fusion_could_be_seen(case, grad):
    (ours, ref_dt, _), gen = _layers(activation="gelu" if case == "gelu" else "relu", gen_seed=2)
    seen, calls = [], []
    if case == "hook":
        for m in (ours, ref_dt):
            m.linear1.register_forward_hook(lambda mod, args, out: seen.append(out))
    elif case == "pre_hook":
        for m in (ours, ref_dt):
            m.linear1.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    elif case == "act_hook":  # an nn.ReLU module whose hook must see its input
        for m in (ours, ref_dt):
            m.activation = nn.ReLU()
            m.activation.register_forward_hook(lambda mod, args, out: seen.append(out))
    elif case == "subclass":
        for m in (ours, ref_dt):
            old = m.linear1
            m.linear1 = _Scaled(E, FF)
            m.linear1.load_state_dict(old.state_dict())
    elif case == "custom":
        def act(t):
            calls.append(1)
            return F.relu(t)

        for m in (ours, ref_dt):
            m.activation = act
    x = torch.randn(2, 7, E, generator=gen, requires_grad=grad)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=case == "autocast"):
        want = nn.TransformerEncoderLayer._ff_block(ref_dt, x)
        n_want = len(seen)
        got, names = _op_names(lambda: ours._ff_block(x))
    assert "aten::_addmm_activation" not in names, names
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # torch's ops on the same values: bit-equal
    if case == "act_hook":
        assert len(seen) == 2 * n_want
    if case == "hook":  # the hook saw linear1's own output
        assert len(seen) == 2 * n_want and (seen[-1] < 0).any()
        torch.testing.assert_close(seen[-1], seen[n_want - 1], rtol=0, atol=0)
    if case == "custom":
        assert len(calls) == 2
    if grad:
        (g,) = torch.autograd.grad(got.sum(), x)
        (g_want,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(g, g_want, rtol=0, atol=0)


def test_patch_model_converts_torch_encoder_layers():
    gen = torch.Generator().manual_seed(3)
    layer = randomize_(nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True), gen, 0.2)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.TransformerDecoderLayer(E, H, FF, batch_first=True))
    ref = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    params = dict(model.named_parameters())
    assert patch_model(model) == 2 + 2  # the attention modules: 2 encoder layers, the decoder's 2
    enc = model[0].layers
    assert all(type(m) is TransformerEncoderLayer for m in enc)
    assert type(model[1]) is nn.TransformerDecoderLayer  # no fused decoder layer: torch's own
    assert all(p is params[n] for n, p in model.named_parameters())
    x = torch.randn(2, 5, E, generator=gen, dtype=torch.float64)
    model.eval(), ref.eval(), ref64.eval()
    with torch.no_grad():
        got, names = _op_names(lambda: model[0](x.float()))
        want = ref[0](x.float())  # torch's fast path
        want64 = ref64[0](x)
    assert "aten::_addmm_activation" in names and "aten::_transformer_encoder_layer_fwd" not in names
    assert_policy(got, want, want64, 2, "output")


def test_forward_ad_and_vmap_get_torch_results():
    """Under no_grad, a forward-mode tangent or a vmap would reach the fused op, which has no forward
    derivative or batching rule: torch's block runs instead."""
    import torch.autograd.forward_ad as fwAD

    (ours, ref_dt, _), gen = _layers(gen_seed=5)
    x, t = torch.randn(2, 7, E, generator=gen), torch.randn(2, 7, E, generator=gen)
    with torch.no_grad(), fwAD.dual_level():
        got = fwAD.unpack_dual(ours._ff_block(fwAD.make_dual(x, t)))
        want = fwAD.unpack_dual(nn.TransformerEncoderLayer._ff_block(ref_dt, fwAD.make_dual(x, t)))
    torch.testing.assert_close(got.tangent, want.tangent, rtol=0, atol=0)
    xs = torch.randn(3, 2, 7, E, generator=gen)
    with torch.no_grad():
        _, names = _op_names(lambda: torch.vmap(ours._ff_block)(xs))
        want = torch.vmap(lambda a: nn.TransformerEncoderLayer._ff_block(ref_dt, a))(xs)
    assert "aten::_addmm_activation" not in names
    torch.testing.assert_close(torch.vmap(ours._ff_block)(xs), want, rtol=0, atol=0)


def test_compiled_layer_matches_eager():
    (ours, _, _), gen = _layers(gen_seed=4)
    x = torch.randn(2, 7, E, generator=gen, requires_grad=True)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ours(x))
    (g,) = torch.autograd.grad(compiled(x).sum(), x)
    (want,) = torch.autograd.grad(ours(x).sum(), x)
    torch.testing.assert_close(g, want)
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ours(x))
