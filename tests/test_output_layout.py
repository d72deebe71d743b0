"""Outputs and gradients in their inputs' layout (``fused_attention/kernels/layout.py``).

Models view a ``(B, N, H * D)`` projection as ``(B, N, H, D)``, transpose it to ``(B, H, N, D)`` for
attention and undo that with ``.transpose(1, 2).contiguous()``: every backend returns the output laid
out ``(B, N, H, D)`` in memory for such inputs, so that undoing copies nothing (as with torch's CPU flash
kernel), and gradients in the layouts of q, k and v, so that the transpose's and view's backward copy
nothing either. Contiguous inputs keep contiguous outputs. Values do not depend on the layout: bit for
bit the same as the call with contiguous inputs and a contiguous upstream gradient.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require, require_call, shared_backends

import fused_attention

B, N, H, HKV, D = 2, 21, 4, 2, 16


def _projection(dtype, heads, tokens=N, gen=None):
    """q, k, v (and the projection they view) as a model makes them: one (B, N, (H + 2 Hkv) D) tensor
    split and transposed (q, k, v are neither contiguous nor dense)."""
    x = torch.randn(B, tokens, (heads + 2 * HKV) * D, generator=gen, dtype=torch.float64).to(dtype)
    x.requires_grad_()
    q, k, v = x.split([heads * D, HKV * D, HKV * D], -1)
    return x, q.view(B, tokens, heads, D).transpose(1, 2), k.view(B, tokens, HKV, D).transpose(1, 2), v.view(
        B, tokens, HKV, D
    ).transpose(1, 2)


def _copies(*tensors):
    return [t.detach().contiguous().requires_grad_() for t in tensors]


def _heads_inside_tokens(t: torch.Tensor) -> bool:
    """(B, H, N, D) laid out (B, N, H, D): transposing back gives a contiguous tensor."""
    return t.transpose(1, 2).is_contiguous()


CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "key_lengths+window": {"key_lengths": torch.tensor([N, 9]), "window_size": (5, 0)},
    "bool_mask": {"attn_mask": torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(1)) > 0.3},
}


@pytest.mark.parametrize("backend", shared_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_take_their_inputs_layout(backend, dtype, case):
    require(backend, dtype)
    kwargs = {"enable_gqa": True, **CASES[case]}
    gen = torch.Generator().manual_seed(0)
    _, q, k, v = _projection(dtype, H, gen=gen)
    require_call(backend, q, k, v, **kwargs)
    out = fused_attention.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
    assert _heads_inside_tokens(out), f"{backend}: out {out.stride()} is not (B, N, H, D) memory"
    assert out.transpose(1, 2).contiguous().data_ptr() == out.data_ptr()
    dout = torch.randn(B, N, H, D, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for name, grad in zip("qkv", grads):
        assert _heads_inside_tokens(grad), f"{backend}: d{name} {grad.stride()} is not (B, N, H, D) memory"

    # the same call on contiguous copies, with a contiguous upstream gradient: contiguous results, equal bits
    qc, kc, vc = _copies(q, k, v)
    out_c = fused_attention.scaled_dot_product_attention(qc, kc, vc, backend=backend, **kwargs)
    assert out_c.is_contiguous()
    grads_c = torch.autograd.grad(out_c, (qc, kc, vc), dout.contiguous())
    assert torch.equal(out, out_c)
    for name, grad, grad_c in zip("qkv", grads, grads_c):
        assert grad_c.is_contiguous(), f"{backend}: d{name} of contiguous inputs is {grad_c.stride()}"
        assert torch.equal(grad, grad_c), f"{backend}: d{name} depends on the layout"


@pytest.mark.parametrize("backend", shared_backends())
def test_one_head_or_one_token_stays_contiguous(backend):
    """With one head or one query row both layouts are the same memory: the output is contiguous."""
    _, q, k, v = _projection(torch.float32, HKV)
    for query in (q[:, :1], q[:, :, -1:]):
        require_call(backend, query, k[:, :1], v[:, :1])
        out = fused_attention.scaled_dot_product_attention(query, k[:, :1], v[:, :1], backend=backend)
        assert out.is_contiguous(), f"{backend}: {tuple(out.shape)} out {out.stride()}"


def test_hugging_face_undoes_the_transpose_without_a_copy(monkeypatch):
    """transformers' BERT with our attention: each layer's attention output, which transformers turns
    back into (B, N, H, D) with .transpose(1, 2).contiguous(), comes back as the kernel's own memory."""
    transformers = pytest.importorskip("transformers")
    from fused_attention.integrations import huggingface

    outputs, returned = [], []
    attention, forward = huggingface.scaled_dot_product_attention, huggingface.fused_attention_forward

    def recording_attention(*args, **kwargs):
        outputs.append(attention(*args, **kwargs))
        return outputs[-1]

    def recording_forward(*args, **kwargs):
        returned.append(forward(*args, **kwargs)[0])
        return returned[-1], None

    monkeypatch.setattr(huggingface, "scaled_dot_product_attention", recording_attention)
    monkeypatch.setattr(huggingface, "fused_attention_forward", recording_forward)
    huggingface.register()  # the recording forward
    try:
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128)
        model = transformers.BertModel(config).eval()
        ids = torch.randint(1, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        model.set_attn_implementation("fused_attention")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        monkeypatch.undo()
        huggingface.register()
    assert len(outputs) == len(returned) == 2
    for out, back in zip(outputs, returned):
        assert back.is_contiguous() and back.shape == (2, 12, 4, 16)
        assert back.data_ptr() == out.data_ptr(), "transformers' layout was a copy of the attention output"
