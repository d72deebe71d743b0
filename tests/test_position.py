"""Positional encodings on every position backend that serves CPU tensors, against formulas written
here (HF-style rotate_half and GPT-J-style pairs, the Transformer paper's table), by DESIGN.md's policy."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_policy, rand

import fused_attention
from fused_attention.backends.positional import POSITION_BACKENDS


def position_backends() -> list[str]:
    probe = torch.zeros(1)
    return [name for name, b in POSITION_BACKENDS.items() if not b.reasons(probe)]


@pytest.fixture(params=position_backends())
def pbackend(request) -> str:
    return request.param


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# --- independent formulas -----------------------------------------------------------------------------


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_pairs(x):
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def rope_formula(x_bshd, cos, sin, positions, interleaved):
    """The textbook formula on ``(B, S, H, D)`` in x's dtype: x * cos + rotate(x) * sin on the first
    2 * cos.shape[1] features, with the per-pair tables expanded to per-feature ones."""
    r = 2 * cos.shape[1]
    c, s = cos.to(x_bshd.dtype)[positions], sin.to(x_bshd.dtype)[positions]  # (B, S, R/2)
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        rot = _rotate_pairs
    else:
        c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        rot = _rotate_half
    head = x_bshd[..., :r]
    out = head * c.unsqueeze(2) + rot(head) * s.unsqueeze(2)
    return torch.cat((out, x_bshd[..., r:]), dim=-1)


def table(seq_len, rotary_dim, base=10000.0):
    inv = [base ** (-2 * i / rotary_dim) for i in range(rotary_dim // 2)]
    angles = torch.tensor([[p * f for f in inv] for p in range(seq_len)], dtype=torch.float64)
    return angles.cos().float(), angles.sin().float()


def _check_rope(pbackend, dtype, *, interleaved, rotary_dim, layout, head_dim=40, positions_mode="offset"):
    b, s, h = 2, 13, 3
    cos, sin = table(64, rotary_dim)
    x = rand(b, h, s, head_dim, dtype=dtype, requires_grad=True) if layout == "bhsd" else rand(
        b, s, h, head_dim, dtype=dtype, requires_grad=True
    )
    kwargs, positions = {}, torch.arange(s).expand(b, s)
    if positions_mode == "offset":
        kwargs["seqlen_offsets"], positions = 5, positions + 5
    elif positions_mode == "tensor":
        offs = torch.tensor([0, 30])
        kwargs["seqlen_offsets"], positions = offs, positions + offs[:, None]
    elif positions_mode == "ids":
        positions = torch.randint(0, 64, (b, s))
        kwargs["position_ids"] = positions
    out = fused_attention.apply_rotary_emb(
        x, cos, sin, interleaved=interleaved, layout=layout, backend=pbackend, **kwargs
    )
    assert out.shape == x.shape and out.dtype == dtype
    to_bshd = (lambda t: t.transpose(1, 2)) if layout == "bhsd" else (lambda t: t)
    upstream = torch.randn(out.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, x, upstream.to(dtype))
    refs = {}
    for dt in (dtype, torch.float64):
        leaf = x.detach().to(dt).requires_grad_()
        ref = rope_formula(to_bshd(leaf), cos, sin, positions, interleaved)
        refs[dt] = (ref, torch.autograd.grad(ref, leaf, to_bshd(upstream.to(dt)))[0])
    assert_policy(to_bshd(out), refs[dtype][0], refs[torch.float64][0], 2, "rotary output")
    assert_policy(grad, refs[dtype][1], refs[torch.float64][1], 3, "rotary grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_rope_dtypes_and_pairings(pbackend, dtype, interleaved):
    torch.manual_seed(0)
    _check_rope(pbackend, dtype, interleaved=interleaved, rotary_dim=40, layout="bhsd")


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("positions_mode", ["zero", "offset", "tensor", "ids"])
@pytest.mark.parametrize("rotary_dim", [16, 40], ids=["partial", "full"])
def test_rope_layouts_positions_partial(pbackend, layout, positions_mode, rotary_dim):
    torch.manual_seed(1)
    _check_rope(pbackend, torch.float32, interleaved=False, rotary_dim=rotary_dim, layout=layout,
                positions_mode=positions_mode)


@pytest.mark.parametrize("head_dim", [72, 80, 128])
def test_rope_head_dims(pbackend, head_dim):
    torch.manual_seed(2)
    _check_rope(pbackend, torch.float32, interleaved=True, rotary_dim=head_dim - 8, layout="bshd", head_dim=head_dim)


def test_rope_non_contiguous_input(pbackend):
    torch.manual_seed(3)
    cos, sin = table(32, 16)
    base = rand(2, 9, 3, 48)
    x = base[..., ::2].transpose(1, 2)  # strided head dim, (B, H, S, D) view of (B, S, H, D)
    out = fused_attention.apply_rotary_emb(x, cos, sin, backend=pbackend)
    ref = rope_formula(x.transpose(1, 2).double(), cos, sin, torch.arange(9).expand(2, 9), False).transpose(1, 2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(base, base.clone())  # untouched: out-of-place


def _layouts():
    """``(layout, x)``: contiguous and permuted, strided and broadcast inputs of both 4-D layouts."""
    yield "bhsd", rand(2, 4, 6, 8)
    yield "bshd", rand(2, 6, 4, 8)
    yield "bhsd", rand(2, 6, 4, 8).transpose(1, 2)
    yield "bshd", rand(2, 4, 6, 8).transpose(1, 2)
    yield "bhsd", rand(2, 4, 6, 16)[..., ::2]
    yield "bhsd", rand(6, 2, 4, 8).permute(1, 2, 0, 3)
    yield "bhsd", rand(2, 4, 8, 6).transpose(-1, -2)
    yield "bhsd", rand(2, 1, 6, 8).expand(2, 4, 6, 8)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_output_is_laid_out_like_x(pbackend, interleaved):
    """Every backend allocates its output as empty_like of the canonical (B, S, H, D) view of x, so a
    contiguous x gives a contiguous output (the torch backend's concatenation along D gave a transposed
    view for "bhsd" x, which .view() refused)."""
    cos, sin = table(16, 6)
    for layout, x in _layouts():
        canonical = (lambda t: t.transpose(1, 2)) if layout == "bhsd" else (lambda t: t)
        expected = canonical(torch.empty_like(canonical(x))).stride()
        out = fused_attention.apply_rotary_emb(x, cos, sin, layout=layout, interleaved=interleaved, backend=pbackend)
        assert out.stride() == expected, (layout, x.stride())
        q_out, k_out = fused_attention.apply_rotary_emb_qk(
            x, x, cos, sin, layout=layout, interleaved=interleaved, backend=pbackend
        )
        assert q_out.stride() == k_out.stride() == expected, (layout, x.stride())
    x = rand(2, 4, 6, 8)
    fused_attention.apply_rotary_emb(x, cos, sin, backend=pbackend).view(2, 4, 48)


def test_rope_packed_varlen(pbackend):
    torch.manual_seed(4)
    cos, sin = table(40, 16)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    x = rand(12, 3, 16)
    offsets = torch.tensor([2, 0, 7])
    out = fused_attention.apply_rotary_emb(x, cos, sin, cu_seqlens=cu, max_seqlen=7, seqlen_offsets=offsets,
                                           backend=pbackend)
    positions = torch.tensor([2, 3, 4, 5, 6] + [7 + i for i in range(7)]).unsqueeze(0)
    ref = rope_formula(x.unsqueeze(0).double(), cos, sin, positions, False)[0]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def _as_bshd(t, layout):
    return t.transpose(1, 2) if layout == "bhsd" else t


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_rope_qk_gqa_one_call(pbackend, layout):
    """q and k (GQA: 8 and 2 heads) rotated in one call equal the textbook formula at positions 3..13,
    and both gradients are the inverse rotation of the upstream gradient (computed by the formula)."""
    torch.manual_seed(5)
    cos, sin = table(32, 32)
    shape = (lambda h: (2, h, 11, 32)) if layout == "bhsd" else (lambda h: (2, 11, h, 32))
    q, k = rand(*shape(8), requires_grad=True), rand(*shape(2), requires_grad=True)
    q_out, k_out = fused_attention.apply_rotary_emb_qk(q, k, cos, sin, layout=layout, seqlen_offsets=3, backend=pbackend)
    positions = (torch.arange(11) + 3).unsqueeze(0).expand(2, -1)
    for a, b in ((q_out, q), (k_out, k)):
        expected = rope_formula(_as_bshd(b.detach(), layout).double(), cos, sin, positions, False)
        torch.testing.assert_close(_as_bshd(a, layout).double(), expected, rtol=1e-5, atol=1e-5)
    gq, gk = torch.autograd.grad((q_out * 2 + 1).sum() + k_out.pow(2).sum(), (q, k))
    for g, upstream in ((gq, torch.full_like(q_out, 2.0)), (gk, 2 * k_out.detach())):
        expected = rope_formula(_as_bshd(upstream, layout).double(), cos, -sin, positions, False)
        torch.testing.assert_close(_as_bshd(g, layout).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_rope_inplace(pbackend, requires_grad):
    torch.manual_seed(6)
    cos, sin = table(32, 24)
    x = rand(2, 4, 9, 24)
    positions = torch.arange(9).unsqueeze(0).expand(2, -1)
    expected = rope_formula(x.transpose(1, 2).double(), cos, sin, positions, True).transpose(1, 2).float()
    y = x.clone().requires_grad_(requires_grad)
    target = y * 1.0 if requires_grad else y  # in-place needs a non-leaf when it requires grad
    out = fused_attention.apply_rotary_emb(target, cos, sin, interleaved=True, inplace=True, backend=pbackend)
    assert out is target
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-6)
    if requires_grad:
        (g,) = torch.autograd.grad(out.sum(), y)
        ones = torch.ones_like(x)
        expected_g = rope_formula(ones.transpose(1, 2).double(), cos, -sin, positions, True).transpose(1, 2)
        torch.testing.assert_close(g.double(), expected_g, rtol=1e-5, atol=1e-5)


def test_rope_inplace_refuses_memory_it_would_write_twice(pbackend):
    """Expanded rows (stride 0 along the sequence) and q passed again as k: an in-place rotation would
    rotate one element several times (the triton kernel returned such rows rotated by several angles)."""
    cos, sin = table(8, 4)
    x = torch.ones(1, 1, 1, 4).expand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="share memory"):
        fused_attention.apply_rotary_emb(x, cos, sin, inplace=True, backend=pbackend)
    assert torch.equal(x, torch.ones(1, 1, 4, 4))
    q = rand(1, 2, 3, 4)
    before = q.clone()
    with pytest.raises(ValueError, match="same memory"):
        fused_attention.apply_rotary_emb_qk(q, q, cos, sin, inplace=True, backend=pbackend)
    assert torch.equal(q, before)
    qkv = rand(1, 3, 3, 2, 4)  # q and k as views of one tensor: distinct memory, rotated once each
    q_view, k_view = qkv[:, :, 0], qkv[:, :, 1]
    expected = [fused_attention.apply_rotary_emb(t, cos, sin, backend=pbackend) for t in (q_view, k_view)]
    fused_attention.apply_rotary_emb_qk(q_view, k_view, cos, sin, inplace=True, backend=pbackend)
    torch.testing.assert_close(q_view, expected[0])
    torch.testing.assert_close(k_view, expected[1])


def test_rope_inplace_refuses_q_and_k_that_partly_overlap(pbackend):
    """Views sharing some elements (heads 0-1 and 1-2 of one buffer) rotated head 1 twice without a word;
    views of one tensor that share no element, interleaved or not, are rotated once each."""
    cos, sin = table(8, 4)
    buf = rand(1, 3, 5, 8)
    before = buf.clone()
    for q, k, layout in ((buf[:, :2], buf[:, 1:], "bhsd"), (buf[:, 1:], buf[:, 2:], "bhsd"),
                         (buf.transpose(1, 2)[:, :, :2], buf.transpose(1, 2)[:, :, 1:], "bshd")):
        with pytest.raises(ValueError, match="same memory, in whole or in part"):
            fused_attention.apply_rotary_emb_qk(q, k, cos, sin, layout=layout, inplace=True, backend=pbackend)
        assert torch.equal(buf, before)
    heads = rand(1, 5, 3, 2, 8)  # (B, S, H, 2, D): q and k heads interleaved
    fused = rand(1, 5, 3, 8).transpose(1, 2)  # two (B, H, S, D) views that split the heads
    for q, k, layout in ((heads[..., 0, :], heads[..., 1, :], "bshd"), (fused[:, :1], fused[:, 1:], "bhsd"),
                         (fused[..., :4], fused[..., 4:], "bhsd")):
        expected = [fused_attention.apply_rotary_emb(t, cos, sin, layout=layout, backend=pbackend) for t in (q, k)]
        fused_attention.apply_rotary_emb_qk(q, k, cos, sin, layout=layout, inplace=True, backend=pbackend)
        torch.testing.assert_close(q, expected[0])
        torch.testing.assert_close(k, expected[1])


def test_rope_tables_that_require_grad_get_their_gradient_or_a_clear_error(pbackend):
    """Learned or derived frequencies: automatic dispatch gives cos/sin the torch backend's gradient (the
    cpu and triton kernels dropped it silently); a forced kernel backend that cannot raises."""
    torch.manual_seed(9)
    cos0, sin0 = table(8, 4)
    x = rand(1, 1, 3, 4, dtype=torch.float64)
    ref_cos, ref_sin = (t.double().requires_grad_() for t in (cos0, sin0))
    fused_attention.apply_rotary_emb(x, ref_cos, ref_sin, backend="torch").pow(2).sum().backward()
    cos, sin = (t.double().requires_grad_() for t in (cos0, sin0))
    fused_attention.apply_rotary_emb(x, cos, sin).pow(2).sum().backward()
    torch.testing.assert_close(cos.grad, ref_cos.grad)
    torch.testing.assert_close(sin.grad, ref_sin.grad)
    if pbackend != "torch":
        with pytest.raises(ValueError, match="cos and sin require grad"):
            fused_attention.apply_rotary_emb(x, cos, sin, backend=pbackend)
    with torch.no_grad():  # no gradient asked for: any backend serves
        fused_attention.apply_rotary_emb(x, cos, sin, backend=pbackend)


@pytest.mark.parametrize("x_requires_grad", [False, True])
@pytest.mark.parametrize("qk", [False, True])
def test_rope_inplace_gives_tables_the_gradient_out_of_place_gives(x_requires_grad, qk):
    """inplace=True with tables that require grad: the tables' gradient was dropped (x requiring grad)
    or the backward raised "modified by an inplace operation" (x not requiring grad)."""
    cos0, sin0 = table(9, 6)
    x0, k0, upstream = rand(2, 3, 7, 8, dtype=torch.float64), rand(2, 1, 7, 8, dtype=torch.float64), None
    for backend in (None, "torch"):
        results = []
        for inplace in (False, True):
            cos, sin = (t.double().requires_grad_() for t in (cos0, sin0))
            leaves = [t.clone().requires_grad_(x_requires_grad) for t in ((x0, k0) if qk else (x0,))]
            inputs = [t * 1.0 for t in leaves]  # in place needs a non-leaf when it requires grad
            kwargs = {"interleaved": True, "seqlen_offsets": 2, "inplace": inplace, "backend": backend}
            if qk:
                outs = fused_attention.apply_rotary_emb_qk(*inputs, cos, sin, **kwargs)
            else:
                outs = (fused_attention.apply_rotary_emb(*inputs, cos, sin, **kwargs),)
            if upstream is None:
                upstream = [torch.randn_like(o) for o in outs]
            wrt = (cos, sin, *leaves) if x_requires_grad else (cos, sin)
            grads = torch.autograd.grad(outs, wrt, upstream)
            results.append(([o.detach() for o in outs], grads))
        (outs, grads), (outs_inplace, grads_inplace) = results
        assert all(torch.equal(a, b) for a, b in zip(outs, outs_inplace))
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_inplace)), backend


def test_rope_gradient_is_inverse_rotation(pbackend):
    torch.manual_seed(7)
    cos, sin = table(16, 8)
    x = rand(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: fused_attention.apply_rotary_emb(t, cos.double(), sin.double(), backend=pbackend), (x,)
    )


# --- sinusoidal ---------------------------------------------------------------------------------------


def sinusoidal_formula(seq_len, dim, offsets, dtype, base=10000.0):
    """``(B or 1, S, D)`` table in ``dtype``: position p = offset + s, frequencies base ** (-2i / dim)."""
    p = (torch.as_tensor(offsets).reshape(-1, 1) + torch.arange(seq_len)).to(dtype).unsqueeze(-1)
    inv = torch.tensor([base ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64).to(dtype)
    pe = torch.empty(*p.shape[:2], dim, dtype=dtype)
    pe[..., 0::2] = torch.sin(p * inv)
    pe[..., 1::2] = torch.cos(p * inv)
    return pe


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("offset", ["zero", "int", "tensor"])
def test_add_sinusoidal(pbackend, dtype, batch_first, offset):
    torch.manual_seed(8)
    b, s, d = 3, 37, 22
    x = rand(b, s, d, dtype=dtype) if batch_first else rand(s, b, d, dtype=dtype)
    x.requires_grad_()
    off = {"zero": 0, "int": 1000, "tensor": torch.tensor([0, 7, 300])}[offset]
    out = fused_attention.add_sinusoidal_position_encoding(x, batch_first=batch_first, offset=off, backend=pbackend)
    assert out.shape == x.shape
    refs = {}
    for dt in (dtype, torch.float64):
        xb = x.detach().to(dt) if batch_first else x.detach().to(dt).transpose(0, 1)
        offs = off if isinstance(off, torch.Tensor) else [off]
        refs[dt] = xb + sinusoidal_formula(s, d, offs, dt)
    ours = out if batch_first else out.transpose(0, 1)
    assert_policy(ours, refs[dtype], refs[torch.float64], 2, "sinusoidal add")
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(g, torch.ones_like(x))


def test_sinusoidal_table_matches_paper():
    pe = fused_attention.sinusoidal_position_encoding(50, 16, offset=3, dtype=torch.float64)
    for p, i in ((0, 0), (10, 3), (49, 7)):
        angle = (p + 3) / 10000 ** (2 * i / 16)
        assert math.isclose(pe[p, 2 * i].item(), math.sin(angle), abs_tol=1e-12)
        assert math.isclose(pe[p, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-12)


def test_sinusoidal_non_contiguous_input(pbackend):
    x = rand(8, 3, 20)[:, :, ::2]  # odd strides
    out = fused_attention.add_sinusoidal_position_encoding(x, backend=pbackend)
    ref = x.double() + sinusoidal_formula(8, 10, [0], torch.float64).transpose(0, 1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# --- ALiBi --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 8, 12, 16, 20])
def test_alibi_slopes_paper_rule(heads):
    def geometric(n):
        return [2 ** (-8 * (k + 1) / n) for k in range(n)]

    closest = 2 ** int(math.log2(heads))
    expected = geometric(closest) + geometric(2 * closest)[::2][: heads - closest]
    slopes = fused_attention.alibi_slopes(heads)
    assert slopes.dtype == torch.float32 and slopes.shape == (heads,)
    torch.testing.assert_close(slopes, torch.tensor(expected, dtype=torch.float32))
    if heads == 8:
        assert slopes.tolist() == [2.0**-k for k in range(1, 9)]


# --- bad input ----------------------------------------------------------------------------------------


def _raises(match, fn, *args, **kwargs):
    with pytest.raises((ValueError, TypeError), match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, RuntimeError)


def test_bad_rotary_input():
    cos, sin = table(16, 8)
    x = rand(1, 2, 5, 8)
    _raises("cos and sin", fused_attention.apply_rotary_emb, x, cos, sin[:, :2])
    _raises("rotary_dim", fused_attention.apply_rotary_emb, rand(1, 2, 5, 6), cos, sin)
    _raises("layout", fused_attention.apply_rotary_emb, x, cos, sin, layout="sbhd")
    _raises("seqlen_offsets", fused_attention.apply_rotary_emb, x, cos, sin, seqlen_offsets=12)
    _raises("position_ids", fused_attention.apply_rotary_emb, x, cos, sin, position_ids=torch.full((1, 5), 16))
    _raises("cu_seqlens", fused_attention.apply_rotary_emb, rand(5, 2, 8), cos, sin,
            cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))
    _raises("x", fused_attention.apply_rotary_emb, rand(5, 2, 8), cos, sin)
    _raises("x must be", fused_attention.apply_rotary_emb, x.int(), cos, sin)
    _raises("k must match", fused_attention.apply_rotary_emb_qk, x, rand(1, 2, 6, 8), cos, sin)
    _raises("backend", fused_attention.apply_rotary_emb, x, cos, sin, backend="nope")


def test_bad_sinusoidal_input():
    _raises("dim", fused_attention.sinusoidal_position_encoding, 4, 7)
    _raises("even", fused_attention.add_sinusoidal_position_encoding, rand(4, 2, 7))
    _raises("offset", fused_attention.add_sinusoidal_position_encoding, rand(4, 2, 8), offset=torch.tensor([1]))
    _raises("x must be 3-D", fused_attention.add_sinusoidal_position_encoding, rand(4, 8))


def test_sparse_inputs_name_themselves():
    """Sparse tensors reached the kernels: the dispatcher's NotImplementedError, or torch's "unsupported
    memory format", naming no argument."""
    cos, sin = table(16, 8)
    x = rand(1, 2, 5, 8)
    _raises("x must be a dense tensor", fused_attention.apply_rotary_emb, x.to_sparse(), cos, sin)
    _raises("cos must be a dense tensor", fused_attention.apply_rotary_emb, x, cos.to_sparse(), sin)
    _raises("sin must be a dense tensor", fused_attention.apply_rotary_emb, x, cos, sin.to_sparse())
    _raises("k must be a dense tensor", fused_attention.apply_rotary_emb_qk, x, x.to_sparse(), cos, sin)
    _raises("x must be a dense tensor", fused_attention.add_sinusoidal_position_encoding, rand(4, 2, 8).to_sparse())


def test_sinusoidal_flags_and_offsets_are_checked(pbackend):
    """batch_first was read for its truth (a string chose the layout); a tensor offset past 2**53 gave angles
    that neighbouring positions share (backends disagreed), where an int offset that large raised."""
    add = fused_attention.add_sinusoidal_position_encoding
    x = rand(2, 4, 8)
    _raises("batch_first must be a bool", add, x, batch_first="yes", backend=pbackend)
    _raises("batch_first must be a bool", add, x, batch_first=1, backend=pbackend)
    last = 2**53 - 4  # the last first position whose 4 positions are exact in float64
    _raises("offset", add, x, batch_first=True, offset=torch.tensor([0, last + 1]), backend=pbackend)
    _raises("offset", add, x, batch_first=True, offset=last + 1, backend=pbackend)
    for offset in (last, torch.tensor([0, last])):
        add(x, batch_first=True, offset=offset, backend=pbackend)


def test_bad_table_parameters_name_themselves():
    """Values that used to divide by zero, take logs of negatives or return tables of NaN or ints."""
    sinusoidal, add = fused_attention.sinusoidal_position_encoding, fused_attention.add_sinusoidal_position_encoding
    for base in (0, -1.0, float("inf"), float("nan")):
        _raises("base", sinusoidal, 4, 4, base=base)
        _raises("base", add, rand(4, 2, 8), base=base)
        _raises("base", fused_attention.rotary_cos_sin, 4, 4, base=base)
    _raises("base", add, rand(4, 2, 8), base=True)
    _raises("dtype", sinusoidal, 3, 4, dtype=torch.int64)
    _raises("dtype", fused_attention.rotary_cos_sin, 4, 4, dtype=torch.int64)

    def scaled(**kw):
        return fused_attention.rotary_cos_sin(32, 8, scaling=kw)

    _raises("original_max_position_embeddings", scaled, rope_type="dynamic", factor=2.0,
            original_max_position_embeddings=0.5)
    _raises("original_max_position_embeddings", scaled, rope_type="yarn", factor=8.0,
            original_max_position_embeddings=-16)
    _raises("original_max_position_embeddings", scaled, rope_type="llama3", factor=8.0,
            original_max_position_embeddings=-16)
    _raises("beta_fast", scaled, rope_type="yarn", factor=8.0, original_max_position_embeddings=16, beta_fast=0)
    _raises("low_freq_factor", scaled, rope_type="llama3", factor=8.0, original_max_position_embeddings=16,
            low_freq_factor=0.0)
    _raises("high_freq_factor", scaled, rope_type="llama3", factor=8.0, original_max_position_embeddings=16,
            low_freq_factor=4.0, high_freq_factor=4.0)
    _raises("factor", scaled, rope_type="linear", factor="2")
    _raises("attention_factor", scaled, rope_type="yarn", factor=8.0, original_max_position_embeddings=16,
            attention_factor=-1.0)
    _raises("truncate", scaled, rope_type="yarn", factor=8.0, original_max_position_embeddings=16, truncate=1)
    # the valid neighbours still build (HF configs give ints for factors)
    scaled(rope_type="linear", factor=2)
    scaled(rope_type="llama3", factor=8, original_max_position_embeddings=16, low_freq_factor=1, high_freq_factor=4)


def test_rope_compile_fullgraph():
    cos, sin = table(32, 16)
    x = rand(2, 3, 7, 16)
    fn = torch.compile(
        lambda t: fused_attention.apply_rotary_emb(t, cos, sin, seqlen_offsets=2, backend="torch"),
        fullgraph=True, backend="aot_eager",
    )
    torch.testing.assert_close(fn(x), fused_attention.apply_rotary_emb(x, cos, sin, seqlen_offsets=2, backend="torch"))


def test_public_position_functions_compile_with_automatic_dispatch():
    cos, sin = table(32, 16)
    q, k = rand(2, 4, 7, 16), rand(2, 2, 7, 16)
    x = rand(9, 2, 12)

    def f(q, k, x):
        q2, k2 = fused_attention.apply_rotary_emb_qk(q, k, cos, sin, seqlen_offsets=3)
        return q2, k2, fused_attention.add_sinusoidal_position_encoding(x, offset=4)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(q, k, x), f(q, k, x)):
        torch.testing.assert_close(a, b)


def test_positions_past_the_table_raise_under_compile():
    """Python checks the positions only outside torch.compile (they are data); inside, the cpu kernel
    raises itself (it had clamped them to the table's last row: wrong angles, no error)."""
    if "cpu" not in position_backends():
        pytest.skip("the cpu position backend is not built")
    q = torch.randn(1, 2, 6, 8)
    cos, sin = fused_attention.rotary_cos_sin(4, 8)
    compiled = torch.compile(lambda x: fused_attention.apply_rotary_emb(x, cos, sin, backend="cpu"), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(ValueError, match="outside the cos/sin table of 4 rows"):
        compiled(q)
    torch.testing.assert_close(compiled(q[:, :, :4]), fused_attention.apply_rotary_emb(q[:, :, :4], cos, sin))


def test_integer_arguments_take_numpy_ints_and_positions_stay_exact():
    """NumPy integers pass where ints do (seqlen_offsets, offset, seq_len, num_heads refused them, max_seqlen
    took them); a position past 2**53, where float64 stops holding every integer, raises naming the argument
    (offset=2**63 gave an empty table, and the cpu kernel an error that named nothing)."""
    np = pytest.importorskip("numpy")
    x, y = torch.randn(1, 2, 5, 8), torch.randn(4, 2, 6)
    cos, sin = fused_attention.rotary_cos_sin(16, 8)
    assert torch.equal(fused_attention.apply_rotary_emb(x, cos, sin, seqlen_offsets=np.int64(3)),
                       fused_attention.apply_rotary_emb(x, cos, sin, seqlen_offsets=3))
    assert torch.equal(fused_attention.alibi_slopes(np.int32(12)), fused_attention.alibi_slopes(12))
    assert torch.equal(fused_attention.sinusoidal_position_encoding(np.int64(4), 6, offset=np.int64(2)),
                       fused_attention.sinusoidal_position_encoding(4, 6, offset=2))
    assert torch.equal(fused_attention.add_sinusoidal_position_encoding(y, offset=np.int64(2)),
                       fused_attention.add_sinusoidal_position_encoding(y, offset=2))
    with pytest.raises(ValueError, match="offset must be an int in"):
        fused_attention.sinusoidal_position_encoding(2, 4, offset=2**63)
    with pytest.raises(ValueError, match="offset must be an int in"):
        fused_attention.add_sinusoidal_position_encoding(y, offset=2**63)
