"""The compiled extension fused_attention._C: how it was built, and its C++/CUDA positional-encoding ops
(sinusoidal add, rotary, rotary_, rotary_qk) against formulas written out here in plain PyTorch."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import assert_policy

from fused_attention._extension import load_extension

STATUS = load_extension()
if not STATUS.loaded:
    pytest.skip(STATUS.reason, allow_module_level=True)

ops = torch.ops.fused_attention
OP_NAMES = [
    "fused_attention::add_sinusoidal_position_encoding",
    "fused_attention::rotary",
    "fused_attention::rotary_",
    "fused_attention::rotary_qk",
]

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def randn(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)


def _cuda_toolkit_present() -> bool:
    # Mirrors setup.py: CUDA kernels are compiled whenever a toolkit is found, GPU or not.
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(
        home and os.path.isfile(os.path.join(home, "bin", "nvcc")) for home in homes
    )


def test_extension_status_reports_how_it_was_built():
    assert STATUS.loaded, STATUS.reason
    for name in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        assert STATUS.has_cuda == torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
    cuda_expected = (
        torch.version.cuda is not None
        and os.environ.get("FUSED_ATTENTION_SKIP_CUDA_BUILD", "") != "1"
        and _cuda_toolkit_present()
    )
    if cuda_expected:
        assert STATUS.has_cuda, (
            "torch is a CUDA build and a CUDA toolkit is present, but fused_attention._C was built without "
            "its CUDA kernels; rebuild, or set FUSED_ATTENTION_SKIP_CUDA_BUILD=1 for a C++-only build"
        )


# ---------------------------------------------------------------------------------------------------
# Sinusoidal: out[b, s] = x[b, s] + PE[p], p = (offsets[b] or offset) + s.


def sinusoidal_formula(x: torch.Tensor, offsets, base: float, dtype: torch.dtype) -> torch.Tensor:
    """x + PE on the CPU with every intermediate in ``dtype``; offsets an int or a (B,) tensor."""
    x = x.detach().cpu().to(dtype)
    batch, seq_len, dim = x.shape
    start = offsets.cpu() if isinstance(offsets, torch.Tensor) else torch.full((batch,), offsets)
    positions = (start[:, None] + torch.arange(seq_len)).to(dtype)  # (B, S)
    exponent = torch.arange(0, dim, 2, dtype=dtype) / dim
    angle = positions[..., None] * torch.pow(torch.tensor(base, dtype=dtype), -exponent)  # (B, S, D/2)
    pe = torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(batch, seq_len, dim)
    return x + pe


def check_sinusoidal(x: torch.Tensor, offsets, base: float = 10000.0, offset: int = 0) -> torch.Tensor:
    """Runs the op (offsets: None, so ``offset`` applies, or a tensor) and applies DESIGN.md's policy."""
    out = ops.add_sinusoidal_position_encoding(x, offsets, offset, base)
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    start = offset if offsets is None else offsets
    ref64 = sinusoidal_formula(x, start, base, torch.float64)
    ref_dt = sinusoidal_formula(x, start, base, x.dtype)
    assert_policy(out, ref_dt, ref64, 2, f"sinusoidal {x.dtype} {tuple(x.shape)}")
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 2), (3, 7, 6), (2, 97, 64), (5, 33, 10), (2, 1025, 40)], ids=str)
@pytest.mark.parametrize("offset", [0, 7, 3000])
def test_sinusoidal_matches_formula(device, dtype, shape, offset):
    check_sinusoidal(randn(*shape, dtype=dtype, device=device), None, offset=offset)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sinusoidal_per_batch_offsets(device, dtype):
    x = randn(4, 37, 24, dtype=dtype, device=device)
    offsets = torch.tensor([0, 5, 1000, 3], device=device)
    check_sinusoidal(x, offsets, offset=123)  # the int offset is ignored when offsets is given
    strided = torch.tensor([9, 0, 2, 0, 40, 0, 7, 0], device=device)[::2]
    check_sinusoidal(x, strided)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sinusoidal_non_contiguous_input(device, dtype):
    sequence_first = randn(41, 3, 12, dtype=dtype, device=device)
    transposed = sequence_first.transpose(0, 1)
    strided_dim = randn(3, 41, 24, dtype=dtype, device=device)[..., ::2]
    broadcast = randn(1, 41, 12, dtype=dtype, device=device).expand(3, 41, 12)
    offsets = torch.tensor([4, 0, 9], device=device)
    for x in (transposed, strided_dim, broadcast):
        assert not x.is_contiguous()
        for offs in (None, offsets):
            out = check_sinusoidal(x, offs, base=500.0, offset=5)
            expected = ops.add_sinusoidal_position_encoding(x.contiguous(), offs, 5, 500.0)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # A sequence-first tensor seen batch-first comes back in the same (sequence-first) memory order.
    out = ops.add_sinusoidal_position_encoding(transposed, None, 0, 10000.0)
    assert out.stride() == transposed.stride()
    assert out.transpose(0, 1).is_contiguous()


def test_sinusoidal_long_sequence_float64():
    # Positions come from a recurrence on the CPU: check it stays at float64 accuracy over long runs.
    x = randn(2, 20000, 16, dtype=torch.float64)
    check_sinusoidal(x, None, offset=123456)
    check_sinusoidal(x, torch.tensor([0, 10**6]))


@pytest.mark.parametrize("device", DEVICES)
def test_sinusoidal_empty(device):
    for shape in ((0, 5, 4), (2, 0, 4)):
        x = randn(*shape, device=device)
        assert ops.add_sinusoidal_position_encoding(x, None, 0, 10000.0).shape == shape


@pytest.mark.parametrize("device", DEVICES)
def test_sinusoidal_bad_input_names_the_argument(device):
    x = randn(2, 4, 6, device=device)
    add = ops.add_sinusoidal_position_encoding
    with pytest.raises(RuntimeError, match=r"x\.size\(-1\) must be even"):
        add(randn(2, 4, 5, device=device), None, 0, 10000.0)
    with pytest.raises(RuntimeError, match=r"x must be 3-D"):
        add(randn(4, 6, device=device), None, 0, 10000.0)
    with pytest.raises(RuntimeError, match=r"x must be float32"):
        add(torch.ones(2, 4, 6, dtype=torch.int32, device=device), None, 0, 10000.0)
    with pytest.raises(RuntimeError, match=r"base must be positive"):
        add(x, None, 0, 0.0)
    with pytest.raises(RuntimeError, match=r"offsets must be int64"):
        add(x, torch.zeros(2, dtype=torch.int32, device=device), 0, 10000.0)
    with pytest.raises(RuntimeError, match=r"offsets must have shape \(batch,\)"):
        add(x, torch.zeros(3, dtype=torch.int64, device=device), 0, 10000.0)


@pytest.mark.parametrize("device", DEVICES)
def test_sinusoidal_input_not_mutated(device):
    x = randn(2, 9, 8, device=device)
    before = x.clone()
    ops.add_sinusoidal_position_encoding(x, None, 0, 10000.0)
    assert torch.equal(x, before)


def test_sinusoidal_gradient_passes_through():
    x = randn(2, 6, 4, dtype=torch.float64).requires_grad_()
    offsets = torch.tensor([3, 8])
    assert torch.autograd.gradcheck(lambda t: ops.add_sinusoidal_position_encoding(t, None, 3, 1e4), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.add_sinusoidal_position_encoding(t, offsets, 0, 1e4), (x,))
    grad = randn(2, 6, 4, dtype=torch.float64)
    (dx,) = torch.autograd.grad(ops.add_sinusoidal_position_encoding(x, offsets, 0, 1e4), x, grad)
    assert torch.equal(dx, grad)


@pytest.mark.parametrize("device", DEVICES)
def test_sinusoidal_opcheck(device):
    offsets = torch.tensor([2, 0, 11], device=device)
    samples = [
        (randn(3, 5, 8, device=device).requires_grad_(), None, 7, 10000.0),
        (randn(3, 5, 8, device=device).requires_grad_(), offsets, 0, 10000.0),
        (randn(5, 3, 16, device=device).transpose(0, 1), None, 2, 100.0),
        (randn(3, 5, 16, device=device)[..., ::2], offsets, 0, 100.0),
    ]
    for args in samples:
        torch.library.opcheck(ops.add_sinusoidal_position_encoding.default, args)


# ---------------------------------------------------------------------------------------------------
# Rotary: pairs (i, i + R/2) (half-split) or (2i, 2i + 1) (interleaved) of x[b, s, h] rotated by the
# angle in row positions[b, s] of the cos/sin tables; features >= R pass through.


def rotary_tables(table_len: int, rotary_dim: int, dtype=torch.float32, device="cpu", base=10000.0):
    """cos, sin of shape (table_len, rotary_dim / 2), from float64 angles."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angle = torch.arange(table_len, dtype=torch.float64)[:, None] * inv_freq
    return angle.cos().to(device=device, dtype=dtype), angle.sin().to(device=device, dtype=dtype)


def rotary_formula(x, cos, sin, positions, interleaved: bool, conjugate: bool, dtype: torch.dtype):
    """The rotation on the CPU with every intermediate in ``dtype``."""
    x = x.detach().cpu().to(dtype)
    half = cos.shape[1]
    rows = positions.cpu().clamp(0, cos.shape[0] - 1)
    c = cos.cpu().to(dtype)[rows][:, :, None, :]  # (B, S, 1, R/2)
    s = sin.cpu().to(dtype)[rows][:, :, None, :]
    if conjugate:
        s = -s
    first = torch.arange(0, 2 * half, 2) if interleaved else torch.arange(half)
    second = first + 1 if interleaved else first + half
    a, b = x[..., first], x[..., second]
    out = x.clone()
    out[..., first] = a * c - b * s
    out[..., second] = b * c + a * s
    return out


def check_rotary(out, x, cos, sin, positions, interleaved, conjugate, factor=2, what="rotary"):
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    ref64 = rotary_formula(x, cos, sin, positions, interleaved, conjugate, torch.float64)
    ref_dt = rotary_formula(x, cos, sin, positions, interleaved, conjugate, x.dtype)
    assert_policy(out, ref_dt, ref64, factor, f"{what} {x.dtype} {tuple(x.shape)}")


def table_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def position_ids(kind: str, batch: int, seq_len: int, table_len: int, device) -> torch.Tensor:
    if kind == "arange":  # stride-0 batch dimension, as users pass it
        return torch.arange(seq_len, device=device).expand(batch, seq_len)
    if kind == "offsets":  # per-batch KV-cache offsets
        start = torch.randint(0, table_len - seq_len + 1, (batch, 1))
        return (start + torch.arange(seq_len)).to(device)
    if kind == "random":
        return torch.randint(0, table_len, (batch, seq_len), device=device)
    assert kind == "transposed"  # non-contiguous
    return torch.randint(0, table_len, (seq_len, batch), device=device).t()


# (B, S, H, D, rotary_dim): odd head dims and sequence lengths, partial rotary dims with passthrough, and
# rotary dims that leave a vector tail.
SHAPES = [(2, 1, 3, 40, 40), (1, 97, 2, 72, 72), (2, 33, 3, 80, 26), (1, 7, 2, 64, 32), (3, 5, 1, 2, 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
@pytest.mark.parametrize("conjugate", [False, True], ids=["forward", "conjugate"])
def test_rotary_matches_formula(device, dtype, shape, interleaved, conjugate):
    batch, seq_len, heads, dim, rotary_dim = shape
    x = randn(batch, seq_len, heads, dim, dtype=dtype, device=device)
    cos, sin = rotary_tables(seq_len + 9, rotary_dim, table_dtype(dtype), device)
    positions = position_ids("offsets", batch, seq_len, seq_len + 9, device)
    out = ops.rotary(x, cos, sin, positions, interleaved, conjugate)
    check_rotary(out, x, cos, sin, positions, interleaved, conjugate)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_rotary_16_bit_rounding_matches_torch(dtype, interleaved):
    # The CPU kernels convert float16/bfloat16 with their own vectorized code: with sin = 0 the output is
    # round(x * cos) exactly, to compare bit for bit with torch's conversion, over subnormals to overflow.
    scales = torch.tensor([1e-7, 1e-5, 1e-2, 1.0, 1e2, 3e4, 1e36], dtype=torch.float64)
    x = randn(3, 7, 5, 46, dtype=torch.float64) * scales[torch.randint(0, 7, (3, 7, 5, 46))]
    x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)  # finite in, overflow out
    cos = torch.rand(9, 21) * 2.5
    positions = position_ids("random", 3, 7, 9, "cpu")
    out = ops.rotary(x, cos, torch.zeros_like(cos), positions, interleaved, False)
    scaled = x.float()
    features = torch.arange(0, 42, 2) if interleaved else torch.arange(21)
    pairs = features + 1 if interleaved else features + 21
    for index in (features, pairs):
        scaled[..., index] = scaled[..., index] * cos[positions][:, :, None, :]
    torch.testing.assert_close(out, scaled.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["arange", "offsets", "random", "transposed"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_rotary_positions(device, kind, interleaved):
    x = randn(3, 19, 4, 48, device=device)
    cos, sin = rotary_tables(50, 32, device=device)
    positions = position_ids(kind, 3, 19, 50, device)
    check_rotary(
        ops.rotary(x, cos, sin, positions, interleaved, False), x, cos, sin, positions, interleaved, False
    )


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_positions_outside_the_table_raise_on_cpu_and_are_clamped_on_cuda(device):
    # Python validates positions on CPU only, and not under torch.compile: the CPU kernel raises, a CUDA
    # kernel (which cannot raise) clamps; neither ever reads outside the table.
    x = randn(2, 3, 2, 8, device=device)
    cos, sin = rotary_tables(5, 8, device=device)
    positions = torch.tensor([[-7, 0, 4], [5, 10**12, 2]], device=device)
    if device == "cpu":
        with pytest.raises(ValueError, match="position -7 falls outside the cos/sin table of 5 rows"):
            ops.rotary(x, cos, sin, positions, False, False)
        return
    out = ops.rotary(x, cos, sin, positions, False, False)
    torch.testing.assert_close(
        out, ops.rotary(x, cos, sin, positions.clamp(0, 4), False, False), rtol=0, atol=0
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_rotary_non_contiguous_input(device, dtype, interleaved):
    cos, sin = rotary_tables(24, 16, device=device)
    positions = position_ids("random", 2, 11, 24, device)
    heads_first = randn(2, 3, 11, 20, dtype=dtype, device=device).permute(0, 2, 1, 3)  # (B, H, S, D) memory
    strided_features = randn(2, 11, 3, 40, dtype=dtype, device=device)[..., ::2]
    broadcast_heads = randn(2, 11, 1, 20, dtype=dtype, device=device).expand(2, 11, 3, 20)
    for x in (heads_first, strided_features, broadcast_heads):
        assert not x.is_contiguous()
        out = ops.rotary(x, cos, sin, positions, interleaved, False)
        check_rotary(out, x, cos, sin, positions, interleaved, False)
        # Strided features take a scalar path whose fused multiply-adds may round differently.
        torch.testing.assert_close(out, ops.rotary(x.contiguous(), cos, sin, positions, interleaved, False))
    # Output memory follows x's (empty_like): heads-first in, heads-first out.
    assert ops.rotary(heads_first, cos, sin, positions, interleaved, False).stride() == heads_first.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_rotary_inplace_matches_out_of_place(device, dtype, interleaved):
    cos, sin = rotary_tables(30, 24, table_dtype(dtype), device)
    positions = position_ids("random", 2, 13, 30, device)
    for x in (
        randn(2, 13, 3, 40, dtype=dtype, device=device),
        randn(2, 3, 13, 40, dtype=dtype, device=device).permute(0, 2, 1, 3),
    ):
        expected = ops.rotary(x, cos, sin, positions, interleaved, True)
        base = x._base if x._base is not None else x
        storage_before = base.clone()
        assert ops.rotary_(x, cos, sin, positions, interleaved, True) is None
        assert torch.equal(x, expected)
        assert not torch.equal(base, storage_before)


def test_rotary_inplace_bumps_the_version_counter():
    # As torch's in-place ops: autograd must refuse a backward that reads a tensor rotated after saving.
    cos, sin = rotary_tables(4, 8)
    positions = position_ids("arange", 2, 4, 4, "cpu")
    x = randn(2, 4, 3, 8)
    version = x._version
    ops.rotary_(x, cos, sin, positions, False, False)
    assert x._version == version + 1
    y = randn(2, 4, 3, 8).requires_grad_() * 1
    saved = y * y
    ops.rotary_(y, cos, sin, positions, False, False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_inplace_rejects_overlapping_memory(device):
    cos, sin = rotary_tables(4, 8, device=device)
    x = randn(1, 4, 1, 8, device=device).expand(2, 4, 3, 8)
    with pytest.raises(RuntimeError, match="internal overlap|single memory location"):
        ops.rotary_(x, cos, sin, position_ids("arange", 2, 4, 4, device), False, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_rotary_qk_gqa(device, dtype, interleaved):
    q = randn(2, 17, 6, 72, dtype=dtype, device=device)
    k = randn(2, 3, 17, 72, dtype=dtype, device=device).transpose(1, 2)  # 3 key heads, stored heads-first
    cos, sin = rotary_tables(40, 64, table_dtype(dtype), device)
    positions = position_ids("offsets", 2, 17, 40, device)
    q_out, k_out = ops.rotary_qk(q, k, cos, sin, positions, interleaved, False)
    check_rotary(q_out, q, cos, sin, positions, interleaved, False, what="rotary_qk q")
    check_rotary(k_out, k, cos, sin, positions, interleaved, False, what="rotary_qk k")
    assert torch.equal(q_out, ops.rotary(q, cos, sin, positions, interleaved, False))
    assert torch.equal(k_out, ops.rotary(k, cos, sin, positions, interleaved, False))


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_empty(device):
    cos, sin = rotary_tables(4, 8, device=device)
    for batch, seq_len in ((0, 3), (2, 0)):
        x = randn(batch, seq_len, 2, 8, device=device)
        positions = torch.zeros(batch, seq_len, dtype=torch.int64, device=device)
        assert ops.rotary(x, cos, sin, positions, False, False).shape == x.shape
        q_out, k_out = ops.rotary_qk(x, x, cos, sin, positions, False, False)
        assert q_out.shape == k_out.shape == x.shape
        ops.rotary_(x, cos, sin, positions, False, False)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_input_not_mutated(device):
    x, k = randn(2, 5, 3, 8, device=device), randn(2, 5, 1, 8, device=device)
    cos, sin = rotary_tables(5, 8, device=device)
    positions = position_ids("arange", 2, 5, 5, device)
    before = [t.clone() for t in (x, k, cos, sin, positions)]
    ops.rotary(x, cos, sin, positions, False, False)
    ops.rotary_qk(x, k, cos, sin, positions, True, True)
    assert all(torch.equal(t, b) for t, b in zip((x, k, cos, sin, positions), before))


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_bad_input_names_the_argument(device):
    x = randn(2, 5, 3, 8, device=device)
    cos, sin = rotary_tables(5, 8, device=device)
    positions = position_ids("arange", 2, 5, 5, device)
    cases = [
        ((randn(2, 5, 8, device=device), cos, sin, positions), r"rotary: x must be 4-D"),
        ((x.int(), cos, sin, positions), r"x must be float32"),
        ((x, cos, sin[:, :2], positions), r"sin must have cos's shape"),
        ((x, cos[0], sin[0], positions), r"cos must be 2-D"),
        (
            (x, cos.double(), sin.double(), positions),
            r"cos and sin must be float32 \(float64 only for float64 inputs\), got Double",
        ),
        ((x.double(), cos, sin, positions), r"cos and sin must be float64 for float64 inputs, got Float"),
        ((x, cos.t().contiguous().t(), sin, positions), r"cos and sin must be contiguous"),
        (
            (x[..., :6], cos, sin, positions),
            r"rotary_dim = 2 \* cos.size\(1\) = 8 must not exceed x.size\(-1\) = 6",
        ),
        ((x, cos, sin, positions.int()), r"positions must be int64"),
        ((x, cos, sin, positions[:, :4]), r"positions must have shape \(batch, seq\) = \(2, 5\)"),
        ((x, cos[:0], sin[:0], positions), r"no rows"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.rotary(*args, False, False)
    with pytest.raises(RuntimeError, match=r"rotary_: x must be 4-D"):
        ops.rotary_(randn(2, 5, 8, device=device), cos, sin, positions, False, False)
    k = randn(2, 5, 1, 8, device=device)
    with pytest.raises(RuntimeError, match=r"rotary_qk: k must have q's dtype"):
        ops.rotary_qk(x, k.half(), cos, sin, positions, False, False)
    with pytest.raises(RuntimeError, match=r"rotary_qk: k must have q's batch and seq sizes"):
        ops.rotary_qk(x, k[:, :4], cos, sin, positions, False, False)
    with pytest.raises(RuntimeError, match=r"rotary_qk: k must be 4-D"):
        ops.rotary_qk(x, k[0], cos, sin, positions, False, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_rotary_gradient_is_rotation_by_minus_theta(device, dtype, interleaved):
    q = randn(2, 9, 4, 40, dtype=dtype, device=device).requires_grad_()
    k = randn(2, 9, 2, 40, dtype=dtype, device=device).requires_grad_()
    cos, sin = rotary_tables(12, 24, table_dtype(dtype), device)
    positions = position_ids("random", 2, 9, 12, device)
    grad_q, grad_k = randn(*q.shape, dtype=dtype, device=device), randn(*k.shape, dtype=dtype, device=device)

    (dq,) = torch.autograd.grad(ops.rotary(q, cos, sin, positions, interleaved, False), q, grad_q)
    check_rotary(dq, grad_q, cos, sin, positions, interleaved, True, factor=3, what="rotary grad")
    (dq,) = torch.autograd.grad(ops.rotary(q, cos, sin, positions, interleaved, True), q, grad_q)
    check_rotary(dq, grad_q, cos, sin, positions, interleaved, False, factor=3, what="rotary conjugate grad")

    q_out, k_out = ops.rotary_qk(q, k, cos, sin, positions, interleaved, False)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (grad_q, grad_k))
    check_rotary(dq, grad_q, cos, sin, positions, interleaved, True, factor=3, what="rotary_qk grad q")
    check_rotary(dk, grad_k, cos, sin, positions, interleaved, True, factor=3, what="rotary_qk grad k")
    # Only q's output used: k's gradient is zero.
    q_out, _ = ops.rotary_qk(q, k, cos, sin, positions, interleaved, False)
    dq, dk = torch.autograd.grad(q_out, (q, k), grad_q)
    check_rotary(dq, grad_q, cos, sin, positions, interleaved, True, factor=3, what="rotary_qk grad q alone")
    assert torch.equal(dk, torch.zeros_like(k))


@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_rotary_gradcheck(interleaved):
    q = randn(2, 5, 3, 10, dtype=torch.float64).requires_grad_()
    k = randn(2, 5, 1, 10, dtype=torch.float64).requires_grad_()
    cos, sin = rotary_tables(8, 6, torch.float64)
    positions = position_ids("random", 2, 5, 8, "cpu")
    assert torch.autograd.gradcheck(lambda t: ops.rotary(t, cos, sin, positions, interleaved, False), (q,))
    assert torch.autograd.gradcheck(
        lambda a, b: ops.rotary_qk(a, b, cos, sin, positions, interleaved, True), (q, k)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_opcheck(device):
    cos, sin = rotary_tables(16, 8, device=device)
    arange = position_ids("arange", 2, 5, 16, device)
    random = position_ids("transposed", 2, 5, 16, device)
    for interleaved, conjugate, positions in ((False, False, arange), (True, True, random)):
        flags = (interleaved, conjugate)
        x = randn(2, 5, 3, 12, device=device).requires_grad_()
        heads_first = randn(2, 3, 5, 12, device=device).permute(0, 2, 1, 3)
        k = randn(2, 5, 1, 12, device=device).requires_grad_()
        torch.library.opcheck(ops.rotary.default, (x, cos, sin, positions, *flags))
        torch.library.opcheck(ops.rotary.default, (heads_first, cos, sin, positions, *flags))
        torch.library.opcheck(ops.rotary_qk.default, (x, k, cos, sin, positions, *flags))
        torch.library.opcheck(ops.rotary_qk.default, (heads_first, k.detach(), cos, sin, positions, *flags))
        torch.library.opcheck(ops.rotary_.default, (x.detach().clone(), cos, sin, positions, *flags))
        torch.library.opcheck(ops.rotary_.default, (heads_first.clone(), cos, sin, positions, *flags))


def test_ops_compile_without_graph_breaks():
    cos, sin = rotary_tables(16, 8)
    positions = position_ids("arange", 2, 11, 16, "cpu")

    def f(x, q, k):
        y = ops.add_sinusoidal_position_encoding(x, None, 3, 10000.0) * 2
        q, k = ops.rotary_qk(q, k, cos, sin, positions, False, False)
        q = ops.rotary(q, cos, sin, positions, True, True)
        k = k.clone()
        ops.rotary_(k, cos, sin, positions, False, True)
        return y, q, k

    args = (randn(2, 11, 6), randn(2, 11, 4, 8), randn(2, 11, 2, 8))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for got, expected in zip(compiled(*args), f(*args)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# 64-bit indexing on the GPU.


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 24 * 2**30,
    reason="needs a CUDA GPU with 24 GiB",
)
def test_cuda_indexing_past_2_pow_31():
    batch, seq_len, dim = 1024, 32800, 64  # 2.15e9 elements > 2**31
    x = torch.randn(batch, seq_len, dim, dtype=torch.bfloat16, device="cuda")
    out = ops.add_sinusoidal_position_encoding(x, None, 0, 10000.0)
    for b, rows in ((0, slice(0, 2)), (batch - 1, slice(seq_len - 2, seq_len))):
        x_rows = x[b : b + 1, rows]
        ref64 = sinusoidal_formula(x_rows, rows.start, 10000.0, torch.float64)
        ref_dt = sinusoidal_formula(x_rows, rows.start, 10000.0, torch.bfloat16)
        assert_policy(out[b : b + 1, rows], ref_dt, ref64, 2, "sinusoidal, last rows")
    del x, out

    batch, seq_len, heads, dim = 2, 65600, 128, 128  # 2.15e9 elements
    x = torch.randn(batch, seq_len, heads, dim, dtype=torch.bfloat16, device="cuda")
    cos, sin = rotary_tables(seq_len, dim, device="cuda")
    positions = position_ids("arange", batch, seq_len, seq_len, "cuda")
    out = ops.rotary(x, cos, sin, positions, False, False)
    tail = slice(seq_len - 2, seq_len)
    check_rotary(
        out[1:, tail], x[1:, tail], cos, sin, positions[1:, tail], False, False, what="rotary, last rows"
    )
