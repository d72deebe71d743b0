"""Whether the Triton interpreter computes ``tl.dot`` on bfloat16 right: one tiny dot, checked once.

Triton's interpreter (``TRITON_INTERPRET=1``) stores bfloat16 as raw 16-bit patterns and, up to at
least Triton 3.8, multiplies those patterns as integers in ``tl.dot``. The probe asks rather than
assumes, so bfloat16 on the CPU lifts itself wherever the interpreter is right (a Triton that fixes it,
or a test harness that patches it). Import this module only where interpreted kernels can run.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_N = 16  # tl.dot's smallest tile


@triton.jit
def _bfloat16_dot_kernel(A, B, C, N: tl.constexpr):
    rows = tl.arange(0, N)[:, None] * N
    cols = tl.arange(0, N)[None, :]
    c = tl.dot(tl.load(A + rows + cols), tl.load(B + rows + cols))
    tl.store(C + rows + cols, c)


@functools.cache
def interpreter_bfloat16_dot_ok() -> bool:
    """True when an interpreted bfloat16 ``tl.dot`` equals the float32 product of the same values
    (small multiples of 1/4: every product and sum is exact in float32)."""
    index = torch.arange(_N * _N).reshape(_N, _N)
    a = ((index * 3 % 7) - 3).to(torch.bfloat16) / 4
    b = ((index * 5 % 11) - 5).to(torch.bfloat16) / 4
    c = torch.empty(_N, _N, dtype=torch.float32)
    _bfloat16_dot_kernel[(1,)](a, b, c, N=_N)
    return torch.equal(c, a.float() @ b.float())
