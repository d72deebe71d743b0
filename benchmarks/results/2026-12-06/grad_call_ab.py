"""The tiny call with inputs that require grad: torch SDPA, the short path and the full path (short path
off), forward and forward + backward, interleaved in one process (call-overhead.md beside this file).

    PYTHONPATH=$PWD python benchmarks/results/2026-12-06/grad_call_ab.py
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_attention
from fused_attention.backends import plain_call

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for call_overhead
import call_overhead

torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 1, 16, 64, generator=gen).requires_grad_() for _ in range(3))
plain = plain_call._PLAIN


def full():
    plain_call._PLAIN = None
    try:
        return fused_attention.scaled_dot_product_attention(q, k, v)
    finally:
        plain_call._PLAIN = plain


def ours():
    return fused_attention.scaled_dot_product_attention(q, k, v)


def theirs():
    return F.scaled_dot_product_attention(q, k, v)


def with_backward(call):
    return lambda: call().sum().backward()


calls = {"torch fwd": theirs, "short fwd": ours, "full fwd": full, "torch fwd+bwd": with_backward(theirs),
         "short fwd+bwd": with_backward(ours), "full fwd+bwd": with_backward(full)}
times = call_overhead.interleaved(calls, 15, 200, time.thread_time)
print(" | ".join(f"{name}: {us:.1f} us" for name, us in times.items()))
