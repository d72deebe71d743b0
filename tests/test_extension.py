"""The compiled extension fused_attention._C: how it was built, and its C++/CUDA op against the formula."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from fused_attention._extension import load_extension

STATUS = load_extension()
if not STATUS.loaded:
    pytest.skip(STATUS.reason, allow_module_level=True)

OP_NAME = "fused_attention::add_sinusoidal_position_encoding"
add_pe = torch.ops.fused_attention.add_sinusoidal_position_encoding.default

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (seq, batch, dim) in the op's default sequence-first layout; odd sizes on purpose.
SHAPES = [(1, 1, 2), (7, 3, 6), (97, 2, 64), (33, 5, 10)]


def sinusoidal_formula(
    x: torch.Tensor, offset: int, base: float, batch_first: bool, dtype: torch.dtype
) -> torch.Tensor:
    """x + PE computed on the CPU with every intermediate in ``dtype``."""
    x = x.cpu().to(dtype)
    seq_len, dim = x.shape[1 if batch_first else 0], x.shape[-1]
    pos = torch.arange(offset, offset + seq_len, dtype=dtype)
    inv_freq = torch.pow(torch.tensor(base, dtype=dtype), -(torch.arange(0, dim, 2, dtype=dtype) / dim))
    angle = pos[:, None] * inv_freq[None, :]
    pe = torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(seq_len, dim)
    return x + (pe[None] if batch_first else pe[:, None])


def assert_matches_formula(out: torch.Tensor, x: torch.Tensor, offset: int, base: float, batch_first: bool):
    """DESIGN.md's policy: error vs float64 at most twice that of the same formula run in x's dtype."""
    ref64 = sinusoidal_formula(x, offset, base, batch_first, torch.float64)
    ref_dt = sinusoidal_formula(x, offset, base, batch_first, x.dtype).double()
    error = (out.cpu().double() - ref64).abs().max().item()
    bound = 2 * (ref_dt - ref64).abs().max().item() + 1e-6
    assert error <= bound, f"max error {error:.3g} > bound {bound:.3g} ({x.dtype}, shape {tuple(x.shape)})"


def _cuda_toolkit_present() -> bool:
    # Mirrors setup.py: CUDA kernels are compiled whenever a toolkit is found, GPU or not.
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(
        home and os.path.isfile(os.path.join(home, "bin", "nvcc")) for home in homes
    )


def test_extension_status_reports_how_it_was_built():
    assert STATUS.loaded, STATUS.reason
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA")
    assert STATUS.has_cuda == has_cuda_kernel
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CPU")
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("offset", [0, 7, 3000])
def test_matches_float64_formula(device, dtype, shape, batch_first, offset):
    seq_len, batch, dim = shape
    size = (batch, seq_len, dim) if batch_first else (seq_len, batch, dim)
    x = torch.randn(size, dtype=dtype, device=device)
    out = add_pe(x, offset, 10000.0, batch_first)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    assert_matches_formula(out, x, offset, 10000.0, batch_first)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_input(device, dtype):
    transposed = torch.randn(3, 41, 12, dtype=dtype, device=device).transpose(0, 1)
    strided_dim = torch.randn(41, 3, 24, dtype=dtype, device=device)[..., ::2]
    broadcast = torch.randn(1, 3, 12, dtype=dtype, device=device).expand(41, 3, 12)
    for x in (transposed, strided_dim, broadcast):
        assert not x.is_contiguous()
        out = add_pe(x, 5, 500.0, False)
        assert out.is_contiguous()
        assert_matches_formula(out, x, 5, 500.0, False)
        torch.testing.assert_close(out, add_pe(x.contiguous(), 5, 500.0, False), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_input_not_mutated(device):
    x = torch.randn(9, 2, 8, device=device)
    before = x.clone()
    add_pe(x, 0, 10000.0, False)
    assert torch.equal(x, before)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_naming_the_argument(device):
    with pytest.raises(RuntimeError, match=r"x\.size\(-1\) must be even"):
        add_pe(torch.randn(4, 2, 5, device=device), 0, 10000.0, False)
    with pytest.raises(RuntimeError, match=r"x must be 3-D"):
        add_pe(torch.randn(4, 6, device=device), 0, 10000.0, False)
    with pytest.raises(RuntimeError, match=r"x must be float32"):
        add_pe(torch.ones(4, 2, 6, dtype=torch.int32, device=device), 0, 10000.0, False)
    with pytest.raises(RuntimeError, match=r"base must be positive"):
        add_pe(torch.randn(4, 2, 6, device=device), 0, 0.0, False)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    samples = [
        (torch.randn(5, 3, 8, device=device, requires_grad=True), 7, 10000.0, False),
        (torch.randn(3, 5, 8, device=device), 0, 10000.0, True),
        (torch.randn(3, 5, 16, device=device).transpose(0, 1)[..., ::2], 2, 100.0, False),
    ]
    for args in samples:
        torch.library.opcheck(add_pe, args)


def test_gradient_is_identity():
    x = torch.randn(6, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: add_pe(t, 3, 10000.0, False), (x,))


def test_compiles_without_graph_breaks():
    def f(x):
        return add_pe(x, 3, 10000.0, True) * 2

    x = torch.randn(2, 11, 6)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 24 * 2**30,
    reason="needs a CUDA GPU with 24 GiB",
)
def test_cuda_indexing_past_2_pow_31():
    seq_len, batch, dim = 32800, 1024, 64  # 2.15e9 elements > 2**31
    x = torch.randn(seq_len, batch, dim, dtype=torch.bfloat16, device="cuda")
    out = add_pe(x, 0, 10000.0, False)
    for rows in (slice(0, 2), slice(seq_len - 2, seq_len)):
        ref64 = sinusoidal_formula(x[rows], rows.start, 10000.0, False, torch.float64)
        ref_dt = sinusoidal_formula(x[rows], rows.start, 10000.0, False, torch.bfloat16).double()
        error = (out[rows].cpu().double() - ref64).abs().max().item()
        assert error <= 2 * (ref_dt - ref64).abs().max().item() + 1e-6
