"""nn modules with ``sinks=True``: a learned, zero-initialised sink logit per head, trained through the
kernels; off, no parameter at all (state_dicts unchanged)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_policy

from fused_attention.nn import MultiheadAttention, SelfAttention
from fused_attention.reference import reference_attention

D, H, B, S = 32, 4, 2, 11


def _random_sinks(module):
    with torch.no_grad():
        module.sinks.copy_(2 * torch.randn(H))


def _self_attention_reference(module, x, dtype, **kwargs):
    """The tutorial formula with the reference attention in ``dtype``."""
    params = {n: p.detach().to(dtype).requires_grad_() for n, p in module.named_parameters()}

    def linear(name, t):
        return t @ params[f"{name}.weight"].T + params[f"{name}.bias"]

    xd = x.to(dtype)
    q, k, v = (linear(n, xd).view(B, S, H, D // H).transpose(1, 2) for n in ("query", "key", "value"))
    out, _ = reference_attention(q, k, v, sinks=params["sinks"], **kwargs)
    return linear("out", out.transpose(1, 2).reshape(B, S, D)), params


@pytest.mark.parametrize("is_causal", [False, True])
def test_self_attention_sinks_values_and_gradients(is_causal):
    torch.manual_seed(0)
    module = SelfAttention(D, H, sinks=True)
    assert torch.equal(module.sinks.detach(), torch.zeros(H)) and module.sinks.dtype == torch.float32
    _random_sinks(module)
    x = torch.randn(B, S, D)
    out = module(x, is_causal=is_causal)
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = dict(zip(
        [n for n, _ in module.named_parameters()],
        torch.autograd.grad(out, list(module.parameters()), upstream.float()),
    ))
    refs = {}
    for dt in (torch.float32, torch.float64):
        ref, params = _self_attention_reference(module, x, dt, is_causal=is_causal)
        refs[dt] = (ref, dict(zip(params, torch.autograd.grad(ref, list(params.values()), upstream.to(dt)))))
    assert_policy(out, refs[torch.float32][0], refs[torch.float64][0], 2, "output")
    for name, grad in grads.items():
        assert_policy(grad, refs[torch.float32][1][name], refs[torch.float64][1][name], 3, f"grad {name}")
    assert grads["sinks"].abs().min() > 0


def test_sinks_off_is_no_parameter_and_state_dicts_load_both_ways():
    plain, with_sinks = SelfAttention(D, H), SelfAttention(D, H, sinks=True)
    assert plain.sinks is None and "sinks" not in plain.state_dict()
    assert "sinks" in with_sinks.state_dict()
    missing = with_sinks.load_state_dict(plain.state_dict(), strict=False)
    assert missing.missing_keys == ["sinks"] and not missing.unexpected_keys
    torch_mha = torch.nn.MultiheadAttention(D, H)
    ours = MultiheadAttention(D, H)
    assert ours.sinks is None and ours.state_dict().keys() == torch_mha.state_dict().keys()
    ours.load_state_dict(torch_mha.state_dict())
    assert MultiheadAttention(D, H, sinks=True).state_dict().keys() == {*torch_mha.state_dict(), "sinks"}


def test_zero_sinks_change_the_output_and_minus_inf_sinks_do_not():
    torch.manual_seed(1)
    module = SelfAttention(D, H, sinks=True)
    plain = SelfAttention(D, H)
    plain.load_state_dict(module.state_dict(), strict=False)
    x = torch.randn(B, S, D)
    assert not torch.allclose(module(x), plain(x), atol=1e-4)  # exp(0) = 1 more mass in each row
    with torch.no_grad():
        module.sinks.fill_(float("-inf"))
    assert torch.allclose(module(x), plain(x), atol=1e-6)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_multihead_attention_sinks(need_weights, training):
    """Output (and weights) against the formula with sinks, in float64; the sinks get their gradient."""
    torch.manual_seed(2)
    module = MultiheadAttention(D, H, batch_first=True, sinks=True, dtype=torch.float64).train(training)
    _random_sinks(module)
    x = torch.randn(B, S, D, dtype=torch.float64)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, 7:] = True
    out, weights = module(x, x, x, key_padding_mask=padding, need_weights=need_weights, average_attn_weights=False)
    q, k, v = (t.view(B, S, H, D // H).transpose(1, 2) for t in torch.nn.functional.linear(
        x, module.in_proj_weight, module.in_proj_bias).chunk(3, -1))
    ref, _ = reference_attention(q, k, v, attn_mask=~padding[:, None, None], sinks=module.sinks)
    ref = torch.nn.functional.linear(ref.transpose(1, 2).reshape(B, S, D), module.out_proj.weight, module.out_proj.bias)
    assert (out - ref).abs().max() < 1e-10
    (dsinks,) = torch.autograd.grad(out.sum(), module.sinks, retain_graph=True)
    (ref_dsinks,) = torch.autograd.grad(ref.sum(), module.sinks)
    assert (dsinks - ref_dsinks).abs().max() < 1e-10
    if need_weights:
        sums = weights.sum(-1)
        assert (sums < 1).all() and (sums > 0).all()


def test_from_torch_with_sinks_and_sixteen_bit_modules():
    torch.manual_seed(3)
    module = MultiheadAttention.from_torch_(torch.nn.MultiheadAttention(D, H, batch_first=True), sinks=True)
    assert torch.equal(module.sinks.detach(), torch.zeros(H))
    x = torch.randn(B, S, D)
    out, _ = module(x, x, x, need_weights=False)
    assert out.shape == (B, S, D)
    half = SelfAttention(D, H, sinks=True).to(torch.bfloat16)
    half(torch.randn(B, S, D, dtype=torch.bfloat16)).float().sum().backward()
    assert half.sinks.grad is not None and half.sinks.grad.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="sinks must be a bool"):
        SelfAttention(D, H, sinks=1)
