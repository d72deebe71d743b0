"""Shared test machinery: which backends run here, input factories, the tolerance policy."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter on CPU tensors. Triton reads this when a
# kernel is defined, so it is set before fused_attention (and its kernels) are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from torch.nn.attention.bias import CausalBias

import fused_attention
from fused_attention.backends import BACKENDS
from fused_attention.check import within_tolerance
from fused_attention.reference import reference_attention


def cpu_backends() -> list[str]:
    """Backends that serve CPU tensors on this machine: every one of them runs the shared suite."""
    names = []
    for name, backend in BACKENDS.items():
        devices = backend.capabilities.device_types
        if backend.unavailable_reason() is None and (devices is None or "cpu" in devices):
            names.append(name)
    return names


@pytest.fixture(params=cpu_backends())
def backend(request) -> str:
    return request.param


def rand(*shape, dtype=torch.float32, requires_grad=False, gen=None) -> torch.Tensor:
    t = torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)
    return t.requires_grad_(requires_grad)


def assert_policy(out: torch.Tensor, ref_dt: torch.Tensor, ref64: torch.Tensor, factor: float, what: str) -> None:
    """DESIGN.md's policy; infinities (lse of empty rows) must match exactly and are then left out."""
    out, ref_dt, ref64 = out.detach(), ref_dt.detach(), ref64.detach()
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    inf = torch.isinf(ref64)
    assert torch.equal(torch.isinf(out), inf), f"{what}: infinities differ from the reference"
    if inf.any():
        out, ref_dt, ref64 = (t.masked_fill(inf, 0.0) for t in (out, ref_dt.to(out.dtype), ref64))
    ok, err, bound = within_tolerance(out, ref_dt, ref64, factor)
    assert ok, f"{what}: max error {err:.3e} > bound {bound:.3e}"


def _leaf(t, dtype):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


def check_attention(backend: str, q, k, v, *, grad: bool = True, **kwargs) -> None:
    """Runs ``backend`` and the reference (in q's dtype and in float64) and applies the policy to the
    output, the lse and the gradients of every input that requires grad (q, k, v, a float mask)."""
    mask = kwargs.get("attn_mask")
    out, lse = fused_attention.scaled_dot_product_attention(q, k, v, return_lse=True, backend=backend, **kwargs)
    results = {}
    for dtype in (q.dtype, torch.float64):
        args = [_leaf(t, dtype) for t in (q, k, v)]
        ref_kwargs = dict(kwargs)
        if isinstance(mask, torch.Tensor) and not isinstance(mask, CausalBias) and mask.is_floating_point():
            ref_kwargs["attn_mask"] = _leaf(mask, dtype if mask.dtype == q.dtype else torch.float64)
        results[dtype] = (args, ref_kwargs, *reference_attention(*args, **ref_kwargs))
    (_, _, ref_dt, lse_dt), (_, _, ref64, lse64) = results[q.dtype], results[torch.float64]
    assert out.dtype == q.dtype
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert_policy(out, ref_dt, ref64, 2, "output")
    assert_policy(lse, lse_dt, lse64, 2, "lse")
    if not grad:
        return
    named = [(n, t) for n, t in zip("qkv", (q, k, v))]
    if not isinstance(mask, CausalBias):
        named.append(("attn_mask", mask))
    names = [n for n, t in named if isinstance(t, torch.Tensor) and t.requires_grad]
    leaves = [t for n, t in named if n in names]
    if not leaves:
        return
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    ref_grads = {}
    for dtype, (args, ref_kwargs, ref_out, _) in results.items():
        # (a CausalBias is never a leaf; on torch 2.6 even reading its requires_grad raises)
        ref_leaves = [t for t in (*args, ref_kwargs.get("attn_mask"))
                      if isinstance(t, torch.Tensor) and not isinstance(t, CausalBias) and t.requires_grad]
        ref_grads[dtype] = torch.autograd.grad(ref_out, ref_leaves, upstream.to(ref_out.dtype))
    for name, g, g_dt, g64 in zip(names, grads, ref_grads[q.dtype], ref_grads[torch.float64]):
        assert_policy(g, g_dt, g64, 3, f"grad {name}")
