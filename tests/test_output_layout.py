"""Outputs and gradients in their inputs' layout (``fused_attention/kernels/layout.py``).

Models view a ``(B, N, H * D)`` projection as ``(B, N, H, D)``, transpose it to ``(B, H, N, D)`` for
attention and undo that with ``.transpose(1, 2).contiguous()``: every backend's kernels return the output
laid out ``(B, N, H, D)`` in memory for such inputs, so that undoing copies nothing (as with torch's CPU
flash kernel), and gradients in the layouts of q, k and v, so that the transpose's and view's backward
copy nothing either. Contiguous inputs keep contiguous outputs. The layouts of the output and of the
upstream gradient do not change values: bit for bit the same as the call with contiguous inputs and a
contiguous upstream gradient.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require, require_call, shared_backends

import fused_attention
from fused_attention.backends import plain_call

B, N, H, HKV, D, DV = 2, 21, 4, 2, 16, 24


def _projection(dtype, heads, tokens=N, gen=None):
    """q, k, v (and the projection they view) as a model makes them: one (B, N, H D + Hkv (D + Dv)) tensor
    split and transposed (q, k, v are neither contiguous nor dense); v's head dim differs."""
    x = torch.randn(B, tokens, heads * D + HKV * (D + DV), generator=gen, dtype=torch.float64).to(dtype)
    x.requires_grad_()
    q, k, v = x.split([heads * D, HKV * D, HKV * DV], -1)
    return (x, *(t.view(B, tokens, -1, t.shape[-1] // n).transpose(1, 2) for t, n in ((q, heads), (k, HKV), (v, HKV))))


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
# "auto": no backend named; on CPU tensors the cpu backend, its short path (plain_call) where the call allows
BACKENDS = [*shared_backends(), *(["auto"] if plain_call._PLAIN is not None else [])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_take_their_inputs_layout(backend, dtype, case, monkeypatch):
    auto = backend == "auto"
    if auto:
        monkeypatch.delenv("FUSED_ATTENTION_BACKEND", raising=False)
    require("cpu" if auto else backend, dtype)
    kwargs = {"enable_gqa": True, **CASES[case]}
    gen = torch.Generator().manual_seed(0)
    _, q, k, v = _projection(dtype, H, gen=gen)
    require_call("cpu" if auto else backend, q, k, v, **kwargs)
    kwargs |= {} if auto else {"backend": backend}
    out = fused_attention.scaled_dot_product_attention(q, k, v, **kwargs)
    if auto and case in ("plain", "causal"):  # the short path's C++ autograd node served the call
        assert "PlainAttention" in out.grad_fn.name()
    assert _heads_inside_tokens(out), f"{backend}: out {out.stride()} is not (B, N, H, D) memory"
    assert out.transpose(1, 2).contiguous().data_ptr() == out.data_ptr()
    dout = torch.randn(B, N, H, DV, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for name, grad in zip("qkv", grads):
        assert _heads_inside_tokens(grad), f"{backend}: d{name} {grad.stride()} is not (B, N, H, D) memory"

    # the same call on contiguous copies, with a contiguous upstream gradient: contiguous results, equal bits
    qc, kc, vc = _copies(q, k, v)
    out_c = fused_attention.scaled_dot_product_attention(qc, kc, vc, **kwargs)
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


@pytest.mark.parametrize("backend", shared_backends())
@pytest.mark.parametrize("rows", [2, 8])
def test_decode_steps_take_the_query_layout(backend, rows):
    """A few query rows against a long cache (the decode kernels: the cpu backend's decode path, whose
    1100 keys go in more than one chunk, merged; triton's split-KV kernel and its combine), q viewed from a
    projection: (B, rows, H, Dv) memory, the same values as for a contiguous q."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(B, rows, H * D, generator=gen)
    q = x.view(B, rows, H, D).transpose(1, 2)
    k = torch.randn(B, HKV, 1100, D, generator=gen)
    v = torch.randn(B, HKV, 1100, DV, generator=gen)
    kwargs = {"enable_gqa": True, "window_size": (-1, 0)}
    require_call(backend, q, k, v, **kwargs)
    with torch.no_grad():
        out = fused_attention.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
        out_c = fused_attention.scaled_dot_product_attention(q.contiguous(), k, v, backend=backend, **kwargs)
    assert _heads_inside_tokens(out), f"{backend}: out {out.stride()}"
    assert out_c.is_contiguous()
    assert torch.equal(out, out_c)


def test_kvcache_bshd_output_is_the_kernels_memory(monkeypatch):
    """attention_with_kvcache in FlashAttention's layout, several query rows: q (B, Lq, H, D) goes in
    transposed, and the (B, Lq, H, Dv) output it returns is the kernel's own memory (no copy)."""
    import fused_attention.kvcache.attention as kvcache_attention

    outputs = []
    attend = kvcache_attention._attend

    def recording(*args, **kwargs):
        out, lse = attend(*args, **kwargs)
        outputs.append(out)
        return out, lse

    monkeypatch.setattr(kvcache_attention, "_attend", recording)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, 5, H, D, generator=gen)
    k_cache = torch.randn(B, 40, HKV, D, generator=gen)
    v_cache = torch.randn(B, 40, HKV, DV, generator=gen)
    for backend in shared_backends():
        out = fused_attention.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=30, is_causal=True,
                                                     backend=backend)
        assert out.shape == (B, 5, H, DV) and out.is_contiguous()
        assert out.data_ptr() == outputs[-1].data_ptr(), f"{backend}: the (B, Lq, H, Dv) output is a copy"


def test_packed_gradients_keep_a_permuted_layout():
    """varlen_attention's gradients are zeros_like(q, k, v) on every backend (the fakes' rule): a packed q
    that is a permuted dense tensor keeps its strides in dq (the cpu extension allocated it contiguous)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(H, 11, D, generator=gen).transpose(0, 1).requires_grad_()  # (T, H, D), heads outermost
    k = torch.randn(11, HKV, D, generator=gen, requires_grad=True)
    v = torch.randn(11, HKV, DV, generator=gen, requires_grad=True)
    cu = torch.tensor([0, 4, 11])
    for backend in shared_backends():
        out = fused_attention.varlen_attention(q, k, v, cu, cu, 7, 7, is_causal=True, backend=backend)
        dq, _, _ = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert dq.stride() == q.stride(), f"{backend}: dq {dq.stride()} for q {q.stride()}"
    if plain_call._PLAIN is not None:  # the extension's op against its fake, strides included
        op = torch.ops.fused_attention.varlen_attention_backward.default
        out, _ = torch.ops.fused_attention.varlen_attention(q, k, v, cu, cu, None, None, None, -1, 0, 0.0, 0.25, 0.0)
        dout = torch.randn(out.shape, generator=gen)
        args = (dout, q.detach(), k.detach(), v.detach(), cu, cu, None, None, None, -1, 0, 0.0, 0.25, 0.0, False, False)
        torch.library.opcheck(op, args)


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
