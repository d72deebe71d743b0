"""The oracle itself: against torch's math SDPA in float64 for every argument torch shares."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

from fused_attention.reference import reference_attention, visibility


def _torch_math(*args, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _qkv(q_shape, k_shape, v_shape):
    return (torch.randn(s, dtype=torch.float64) for s in (q_shape, k_shape, v_shape))


CASES = {
    "plain": ((2, 3, 7, 8), (2, 3, 9, 8), (2, 3, 9, 8), {}),
    "causal_long_q": ((2, 3, 9, 8), (2, 3, 7, 8), (2, 3, 7, 8), {"is_causal": True}),
    "causal": ((2, 3, 7, 8), (2, 3, 9, 8), (2, 3, 9, 5), {"is_causal": True}),
    "scale": ((2, 3, 7, 8), (2, 3, 9, 8), (2, 3, 9, 8), {"scale": 0.37}),
    "gqa": ((2, 6, 7, 8), (2, 2, 9, 8), (2, 2, 9, 8), {"enable_gqa": True}),
    "three_dim": ((4, 7, 8), (4, 9, 8), (4, 9, 8), {}),
    "three_dim_gqa": ((6, 7, 8), (2, 9, 8), (2, 9, 8), {"enable_gqa": True}),  # torch groups dim -3
    "five_dim_broadcast": ((2, 2, 3, 7, 8), (1, 2, 3, 9, 8), (2, 1, 3, 9, 8), {}),
    "bool_mask": ((2, 3, 7, 8), (2, 3, 9, 8), (2, 3, 9, 8), {"attn_mask": "bool"}),
    "float_mask": ((2, 3, 7, 8), (2, 3, 9, 8), (2, 3, 9, 8), {"attn_mask": "float"}),
    "causal_upper_left": ((2, 3, 7, 8), (2, 3, 9, 8), (2, 3, 9, 8), {"attn_mask": causal_upper_left(7, 9)}),
    "causal_lower_right": ((2, 3, 7, 8), (2, 3, 9, 8), (2, 3, 9, 8), {"attn_mask": causal_lower_right(7, 9)}),
}


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_torch_math(name):
    torch.manual_seed(0)
    q_shape, k_shape, v_shape, kwargs = CASES[name]
    q, k, v = (t.requires_grad_() for t in _qkv(q_shape, k_shape, v_shape))
    kwargs = dict(kwargs)
    if kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.rand(q_shape[-2], k_shape[-2]) > 0.3
    elif kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.randn(1, q_shape[1], q_shape[-2], k_shape[-2], dtype=torch.float64)
    ours, _ = reference_attention(q, k, v, **kwargs)
    theirs = _torch_math(q, k, v, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(theirs, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_reference_dropout_mask_matches_torch_formula():
    q, k, v = _qkv((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 4))
    keep = torch.rand(1, 2, 5, 6) > 0.4
    ours, _ = reference_attention(q, k, v, dropout_p=0.4, dropout_mask=keep)
    probs = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
    torch.testing.assert_close(ours, (probs * keep / 0.6) @ v)


def test_reference_lse_and_fully_masked_row():
    q, k, v = _qkv((1, 1, 3, 4), (1, 1, 5, 4), (1, 1, 5, 4))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    q.requires_grad_()
    out, lse = reference_attention(q, k, v, attn_mask=mask)
    scores = q @ k.transpose(-2, -1) / 2.0
    torch.testing.assert_close(lse[0, 0, [0, 2]], torch.logsumexp(scores, -1)[0, 0, [0, 2]])
    assert lse[0, 0, 1] == float("-inf") and (out[0, 0, 1] == 0).all()
    (g,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(g).all() and (g[0, 0, 1] == 0).all()


def _as_int(t):
    return t.int().tolist()


def test_visibility_worked_example():
    """The issue's worked example, L=2, S=5."""
    assert _as_int(visibility(2, 5, is_causal=True)) == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert _as_int(visibility(2, 5, causal_lower_right=True)) == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert _as_int(visibility(2, 5, window_size=(1, 0))) == [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    assert _as_int(visibility(2, 5, is_causal=True, window_size=(1, 0))) == [[0] * 5, [0] * 5]


def test_reference_extensions_by_hand():
    """ALiBi, softcap and key lengths against the formula written out on one small case."""
    torch.manual_seed(1)
    q, k, v = _qkv((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4))
    slopes = torch.tensor([0.5, 0.25])
    out, _ = reference_attention(
        q, k, v, alibi_slopes=slopes, softcap=3.0, key_lengths=torch.tensor([4]), window_size=(2, -1)
    )
    s = q @ k.transpose(-2, -1) / 2.0
    s = 3.0 * torch.tanh(s / 3.0)
    pos = torch.arange(3).unsqueeze(1) + 2
    j = torch.arange(5).unsqueeze(0)
    s = s - slopes.double().view(2, 1, 1) * (pos - j).abs()
    s = s.masked_fill((j >= 4) | (j < pos - 2), float("-inf"))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)
