"""Triton positional-encoding ops (sinusoidal add, rotary) against formulas written here.

Without a GPU they run under the Triton interpreter: ``TRITON_INTERPRET=1`` has to be in the environment
before the kernel modules are imported (``@triton.jit`` picks interpreter or compiler when it decorates).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_policy

pytest.importorskip("triton")

from fused_attention.kernels.triton import rotary as rotary_kernels
from fused_attention.kernels.triton import sinusoidal as sinusoidal_kernels
from fused_attention.kernels.triton import triton_unavailable_reason
from fused_attention.ops import triton_positional as ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REPO = Path(__file__).resolve().parents[1]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=gen)


# ---------------------------------------------------------------- formulas (every intermediate in `dtype`)


def rope_formula(x, cos, sin, positions, interleaved: bool, conjugate: bool, dtype: torch.dtype):
    """RoPE of ``x`` ``(B, S, H, D)``: pairs ``(a, b)`` -> ``(a cos - b sin, b cos + a sin)``."""
    x = x.to(dtype)
    rows = positions.clamp(0, cos.shape[0] - 1)
    c = cos.to(dtype)[rows][:, :, None, :]  # (B, S, 1, R/2)
    s = sin.to(dtype)[rows][:, :, None, :]
    if conjugate:
        s = -s
    half = cos.shape[1]
    rot = 2 * half
    if interleaved:
        a, b = x[..., 0:rot:2], x[..., 1:rot:2]
    else:
        a, b = x[..., :half], x[..., half:rot]
    new_a, new_b = a * c - b * s, b * c + a * s
    rotated = torch.stack([new_a, new_b], dim=-1).flatten(-2) if interleaved else torch.cat([new_a, new_b], -1)
    return torch.cat([rotated, x[..., rot:]], dim=-1)


def sinusoidal_formula(x, starts, base: float, dtype: torch.dtype):
    """``x + PE`` for ``x`` ``(B, S, D)``; row s of batch b at position ``starts[b] + s``."""
    _, seq, dim = x.shape
    positions = (starts[:, None] + torch.arange(seq)).to(dtype)  # (B, S)
    exponents = -torch.arange(0, dim, 2, dtype=dtype) / dim
    inv_freq = torch.pow(torch.tensor(base, dtype=dtype), exponents)
    angle = positions[..., None] * inv_freq  # (B, S, D/2)
    pe = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).flatten(-2)
    return x.to(dtype) + pe


def rope_table(length: int, half: int, base: float = 10000.0, dtype=torch.float32):
    angle = torch.arange(length, dtype=torch.float64)[:, None] * base ** (-torch.arange(half) / half)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def bshd_from_bhsd(batch, heads, seq, dim, dtype, gen) -> torch.Tensor:
    """A ``(B, S, H, D)`` view of a ``(B, H, S, D)`` tensor: what a user's ``(B, H, S, D)`` q becomes."""
    return randn(batch, heads, seq, dim, gen=gen).to(dtype).permute(0, 2, 1, 3)


def leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_(True)


def test_available_here():
    assert triton_unavailable_reason(DEVICE) is None
    assert "mps" in triton_unavailable_reason(torch.device("mps"))


# ---------------------------------------------------------------- rotary

ROPE_CASES = {
    # name: (batch, seq, heads, head_dim, rotary half, positions kind, conjugate)
    "d80-full-expanded": (2, 5, 3, 80, 40, "expanded", False),
    "d72-partial-random-conj": (2, 4, 2, 72, 16, "random", True),
    "d64-partial-clamped": (1, 6, 2, 64, 24, "out_of_range", False),
}


def _positions(kind: str, batch: int, seq: int, table_len: int, gen) -> torch.Tensor:
    if kind == "expanded":  # stride-0 over the batch: arange + offset, as a prefill step builds it
        return (torch.arange(seq) + 3).expand(batch, seq)
    if kind == "random":
        return torch.randint(0, table_len, (batch, seq), generator=gen)
    return torch.randint(-5, table_len + 5, (batch, seq), generator=gen)  # clamped to the table


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rotary(case, dtype, interleaved):
    batch, seq, heads, dim, half, kind, conjugate = ROPE_CASES[case]
    gen = _gen(2 * list(ROPE_CASES).index(case) + interleaved)
    x = bshd_from_bhsd(batch, heads, seq, dim, dtype, gen)
    table_dtype = torch.float64 if dtype == torch.float64 and kind == "random" else torch.float32
    cos, sin = rope_table(seq + 11, half, dtype=table_dtype)
    positions = _positions(kind, batch, seq, cos.shape[0], gen)

    x_in = x.detach().clone().requires_grad_(True)
    args = (cos.to(DEVICE), sin.to(DEVICE), positions.to(DEVICE), interleaved, conjugate)
    out = ops.triton_rotary(x_in.to(DEVICE), *args)
    assert out.dtype == dtype and out.stride() == x.stride()
    refs = {}
    for ref_dtype in (dtype, torch.float64):
        ref_x = leaf(x, ref_dtype)
        refs[ref_dtype] = ref_x, rope_formula(ref_x, cos, sin, positions, interleaved, conjugate, ref_dtype)
    assert_policy(out.cpu(), refs[dtype][1], refs[torch.float64][1], 2, "rotary")
    if half * 2 < dim:  # the features past the rotary dim are copied bit for bit
        assert torch.equal(out[..., 2 * half :].cpu(), x[..., 2 * half :])

    upstream = randn(*out.shape, gen=gen)
    (grad,) = torch.autograd.grad(out, x_in, upstream.to(dtype).to(DEVICE))
    ref_grads = {d: torch.autograd.grad(r, rx, upstream.to(d))[0] for d, (rx, r) in refs.items()}
    assert_policy(grad.cpu(), ref_grads[dtype], ref_grads[torch.float64], 3, "rotary grad x")


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_inplace(dtype, interleaved):
    gen = _gen(7)
    x = bshd_from_bhsd(2, 3, 5, 72, dtype, gen).to(DEVICE)
    before = x.clone()
    cos, sin = rope_table(9, 20)
    positions = torch.randint(0, 9, (2, 5), generator=gen)
    storage, strides = x.data_ptr(), x.stride()
    assert ops.triton_rotary_(x, cos.to(DEVICE), sin.to(DEVICE), positions.to(DEVICE), interleaved, True) is None
    assert x.data_ptr() == storage and x.stride() == strides
    ref_dt = rope_formula(before.cpu(), cos, sin, positions, interleaved, True, dtype)
    ref64 = rope_formula(before.cpu(), cos, sin, positions, interleaved, True, torch.float64)
    assert_policy(x.cpu(), ref_dt, ref64, 2, "rotary_")
    assert torch.equal(x[..., 40:], before[..., 40:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_rotary_qk(kv_heads, interleaved, dtype, monkeypatch):
    gen = _gen(11 + kv_heads)
    batch, seq, dim, half = 2, 4, 40, 12
    q = bshd_from_bhsd(batch, 4, seq, dim, dtype, gen)
    k = randn(batch, seq, kv_heads, dim, gen=gen).to(dtype)  # contiguous (B, S, H, D)
    cos, sin = rope_table(16, half)
    positions = torch.randint(0, 16, (batch, seq), generator=gen)

    launches = []
    kernel = rotary_kernels._rotary_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(rotary_kernels, "_rotary_kernel", Counting())
    q_in, k_in = (t.detach().clone().requires_grad_(True) for t in (q, k))
    args = (cos.to(DEVICE), sin.to(DEVICE), positions.to(DEVICE), interleaved, False)
    q_out, k_out = ops.triton_rotary_qk(q_in.to(DEVICE), k_in.to(DEVICE), *args)
    assert len(launches) == 1
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()

    refs = {}
    for ref_dtype in (dtype, torch.float64):
        rq, rk = leaf(q, ref_dtype), leaf(k, ref_dtype)
        outs = [rope_formula(t, cos, sin, positions, interleaved, False, ref_dtype) for t in (rq, rk)]
        refs[ref_dtype] = (rq, rk), outs
    for i, (name, out) in enumerate((("q", q_out), ("k", k_out))):
        assert_policy(out.cpu(), refs[dtype][1][i], refs[torch.float64][1][i], 2, f"rotary_qk {name}")

    ups = [randn(*t.shape, gen=gen) for t in (q_out, k_out)]
    grads = torch.autograd.grad((q_out, k_out), (q_in, k_in), [u.to(dtype).to(DEVICE) for u in ups])
    assert len(launches) == 2  # the backward is one launch too
    ref_grads = {
        d: torch.autograd.grad(outs, leaves, [u.to(d) for u in ups]) for d, (leaves, outs) in refs.items()
    }
    for i, name in enumerate("qk"):
        assert_policy(grads[i].cpu(), ref_grads[dtype][i], ref_grads[torch.float64][i], 3, f"grad {name}")


def test_rotary_qk_grad_of_one_output():
    gen = _gen(5)
    q = randn(1, 3, 2, 16, gen=gen).requires_grad_(True)
    k = randn(1, 3, 1, 16, gen=gen).requires_grad_(True)
    cos, sin = rope_table(3, 8, dtype=torch.float64)
    positions = torch.arange(3)[None]
    q_out, _ = ops.triton_rotary_qk(q.to(DEVICE), k.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE),
                                    positions.to(DEVICE), False, False)  # fmt: skip
    grad_q, grad_k = torch.autograd.grad(q_out.sum(), (q, k))
    expected = rope_formula(torch.ones_like(q), cos, sin, positions, False, True, torch.float64)
    assert_policy(grad_q, expected, expected, 3, "grad q")
    assert torch.count_nonzero(grad_k) == 0


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_rotary_several_head_blocks(interleaved, monkeypatch):
    """Small tiles: the head loop runs several blocks, the last one partly masked, for q and for k."""
    monkeypatch.setattr(rotary_kernels, "_TILE_PAIRS", 32)  # 2 heads per block with R/2 = 12 (padded to 16)
    gen = _gen(21)
    q, k = randn(1, 3, 5, 40, gen=gen), randn(1, 3, 3, 40, gen=gen)
    cos, sin = rope_table(3, 12, dtype=torch.float64)
    positions = torch.arange(3)[None]
    q_out, k_out = ops.triton_rotary_qk(q.to(DEVICE), k.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE),
                                        positions.to(DEVICE), interleaved, False)  # fmt: skip
    for name, x, out in (("q", q, q_out), ("k", k, k_out)):
        ref = rope_formula(x, cos, sin, positions, interleaved, False, torch.float64)
        assert_policy(out.cpu(), ref, ref, 2, name)


def test_rotary_rejects_what_its_indexing_cannot_serve():
    x = torch.zeros(1, 3, 2, 16, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_table(4, 8))
    with pytest.raises(ValueError, match="positions"):
        ops.triton_rotary(x, cos, sin, torch.zeros(1, 4, dtype=torch.long, device=DEVICE), False, False)
    with pytest.raises(ValueError, match="cos/sin"):
        ops.triton_rotary(x, cos, sin[:, :4], torch.zeros(1, 3, dtype=torch.long, device=DEVICE), False, False)


# ---------------------------------------------------------------- sinusoidal


@pytest.mark.parametrize("offsets", ["none", "int", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_sinusoidal(dtype, offsets):
    gen = _gen(3)
    seq, batch, dim = 9, 3, 80
    x = randn(seq, batch, dim, gen=gen).to(dtype).transpose(0, 1)  # sequence-first input, as a view
    offset_tensor = torch.tensor([0, 17, 300]) if offsets == "tensor" else None
    offset = 5 if offsets == "int" else 0
    starts = offset_tensor if offset_tensor is not None else torch.full((batch,), offset)

    x_in = x.detach().clone().requires_grad_(True)
    device_offsets = offset_tensor.to(DEVICE) if offset_tensor is not None else None
    out = ops.triton_add_sinusoidal(x_in.to(DEVICE), device_offsets, offset, 10000.0)
    assert out.dtype == dtype and out.stride() == x.stride()
    ref_dt = sinusoidal_formula(x, starts, 10000.0, dtype)
    ref64 = sinusoidal_formula(x, starts, 10000.0, torch.float64)
    assert_policy(out.cpu(), ref_dt, ref64, 2, "add_sinusoidal")

    upstream = randn(*out.shape, gen=gen).to(dtype)
    (grad,) = torch.autograd.grad(out, x_in, upstream.to(DEVICE))
    assert torch.equal(grad.cpu(), upstream)


def test_add_sinusoidal_odd_sizes_and_base():
    gen = _gen(4)
    x = randn(2, 3, 6, gen=gen)  # D/2 = 3: padded lanes; base that float32 cannot hold exactly
    out = ops.triton_add_sinusoidal(x.to(DEVICE), None, 1000, 12345.678)
    ref = sinusoidal_formula(x, torch.full((2,), 1000), 12345.678, torch.float64)
    assert_policy(out.cpu(), ref, ref, 2, "float64, offset 1000")


@pytest.mark.parametrize("with_offsets", [False, True], ids=["int", "tensor"])
def test_add_sinusoidal_several_tiles(with_offsets, monkeypatch):
    """Small tiles: several (partly masked) row and feature blocks per batch."""
    monkeypatch.setattr(sinusoidal_kernels, "_MAX_BLOCK_PAIRS", 16)  # 40 pairs: 3 blocks
    monkeypatch.setattr(sinusoidal_kernels, "_TILE_PAIRS", 64)  # 4 rows: 3 blocks for 9 rows
    gen = _gen(8)
    x = randn(2, 9, 80, gen=gen)
    starts = torch.tensor([4, 11])
    offsets = starts.to(DEVICE) if with_offsets else None
    out = ops.triton_add_sinusoidal(x.to(DEVICE), offsets, 4, 10000.0)
    ref = sinusoidal_formula(x, starts if with_offsets else torch.full((2,), 4), 10000.0, torch.float64)
    assert_policy(out.cpu(), ref, ref, 2, "tiles")


# ---------------------------------------------------------------- torch.library integration


def _opcheck_samples():
    gen = _gen(9)
    x = bshd_from_bhsd(1, 2, 3, 24, torch.float32, gen).to(DEVICE)
    k = randn(1, 3, 1, 24, gen=gen).float().to(DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_table(4, 8))
    positions = torch.arange(3, device=DEVICE).expand(1, 3)
    rope = (cos, sin, positions, False, False)
    seq_first = randn(3, 2, 8, gen=gen).float().to(DEVICE).transpose(0, 1)
    return [
        (ops.triton_rotary, (x.requires_grad_(True), *rope)),
        (ops.triton_rotary_, (x.detach().clone(), cos, sin, positions, True, True)),
        (ops.triton_rotary_qk, (x.detach().clone().requires_grad_(True), k.requires_grad_(True), *rope)),
        (ops.triton_add_sinusoidal, (seq_first.requires_grad_(True), None, 2, 10000.0)),
        (ops.triton_add_sinusoidal, (seq_first.detach(), torch.tensor([1, 4], device=DEVICE), 0, 500.0)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_opcheck(index):
    op, args = _opcheck_samples()[index]
    torch.library.opcheck(op, args)


def test_compile_fullgraph():
    gen = _gen(13)
    x = bshd_from_bhsd(1, 2, 4, 16, torch.float32, gen).to(DEVICE).requires_grad_(True)
    cos, sin = (t.to(DEVICE) for t in rope_table(8, 8))
    positions = (torch.arange(4, device=DEVICE) + 2).expand(1, 4)

    def f(x, cos, sin, positions):
        return ops.triton_rotary(x * 2, cos, sin, positions, False, False).sum(dim=-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, cos, sin, positions)
    expected = f(x, cos, sin, positions)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad)


def test_unavailable_reasons_without_interpreter():
    """In a fresh process without TRITON_INTERPRET: CPU tensors are refused, with a reason, and still
    after TRITON_INTERPRET=1 is set once the kernels were defined for the compiler."""
    script = (
        "import os, torch\n"
        "from fused_attention.kernels.triton import triton_unavailable_reason as why\n"
        "print(why(torch.device('cpu')))\n"
        "import fused_attention.kernels.triton.rotary\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "print(why(torch.device('cpu')))\n"
        "print(why(torch.device('cuda')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    before, after, cuda = result.stdout.splitlines()
    assert "TRITON_INTERPRET=1" in before
    assert "imported without TRITON_INTERPRET=1" in after
    assert cuda == "None"


_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_attention.kernels.triton import rotary, sinusoidal

def build(kernel, arch, pointers, constexprs):
    # what a launch specializes: pointer types, unit feature strides, 16-divisible ints and pointers
    constexprs = {**constexprs, **{n: 1 for n in kernel.arg_names if n.endswith(("_xd", "_od", "_qd", "_qod",
                  "_kd", "_kod", "_cr", "_sr"))}}
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
               if signature[n] != "constexpr" and n not in ("offset", "n_q_heads", "n_k_heads")}
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32))

def rope(dtype, interleaved, conjugate, copy_tail):
    pointers = {n: "*" + dtype for n in ("q_ptr", "q_out_ptr", "k_ptr", "k_out_ptr")}
    pointers.update(cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr="*i64")
    flags = dict(INTERLEAVED=interleaved, CONJUGATE=conjugate, COPY_TAIL=copy_tail, FP64=dtype == "fp64")
    return rotary._rotary_kernel, pointers, dict(BLOCK_R2=64, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_TAIL=16, **flags)

def sinus(dtype, has_offsets):
    pointers = dict(x_ptr="*" + dtype, out_ptr="*" + dtype, offsets_ptr="*i64", log2_base_hi="fp32",
                    log2_base_lo="fp32")
    flags = dict(HAS_OFFSETS=has_offsets, FP64=dtype == "fp64", BLOCK_S=4, BLOCK_PAIRS=512)
    return sinusoidal._add_sinusoidal_kernel, pointers, flags

cases = [
    (90, rope("fp32", False, True, True)), (90, rope("bf16", True, False, False)),
    (90, rope("fp64", True, True, True)), (90, rope("fp16", False, False, False)),
    (90, sinus("fp32", True)), (90, sinus("bf16", False)), (90, sinus("fp64", True)),
    (80, rope("bf16", True, True, True)), (80, sinus("fp16", False)),
]
for arch, (kernel, pointers, constexprs) in cases:
    compiled = build(kernel, arch, pointers, constexprs)
    assert compiled.asm["cubin"], (arch, kernel.__name__, constexprs)
print("compiled", len(cases))
"""


@pytest.mark.slow
def test_kernels_compile_for_gpus():
    """The interpreter never runs Triton's compiler: compile representative specializations of each
    kernel (every constexpr branch at least once) ahead of time for sm_90 and sm_80, no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["compiled", "9"]
