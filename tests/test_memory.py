"""Peak memory: forward+backward at L = S = 8192 stays far below one L x S matrix (RSS, fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import cpu_backends

L = S = 8192
_LXS_FLOAT32 = L * S * 4

_SCRIPT = r"""
import json, resource, sys
import torch
import fused_attention

def peak_rss():
    # VmHWM: this process's own peak. ru_maxrss would start at the parent's (pytest's) peak, since Linux
    # keeps it across exec, and hide any growth below that.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

backend, kwargs = sys.argv[1], json.loads(sys.argv[2])
if "alibi_slopes" in kwargs:
    kwargs["alibi_slopes"] = torch.full((kwargs["alibi_slopes"],), 0.1)
if "key_lengths" in kwargs:
    kwargs["key_lengths"] = torch.tensor(kwargs["key_lengths"])
if "window_size" in kwargs:
    kwargs["window_size"] = tuple(kwargs["window_size"])

# Load kernels, thread pools and allocator arenas before the baseline.
q, k, v = (torch.randn(1, 1, 256, 64, requires_grad=True) for _ in range(3))
fused_attention.scaled_dot_product_attention(q, k, v, backend=backend, softcap=5.0).sum().backward()
q, k, v = (torch.randn(1, 1, {n}, 64, requires_grad=True) for _ in range(3))
grads = [torch.randn_like(t) for t in (q, k, v)]  # room for the gradients, also before the baseline
del grads
base = peak_rss()
out = fused_attention.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
out.backward(torch.randn_like(out))
peak = peak_rss()
print(json.dumps({"growth": peak - base}))
""".replace("{n}", str(L))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"is_causal": True}, {"alibi_slopes": 1, "softcap": 20.0, "key_lengths": [6000]}, {"window_size": [255, 0]}],
    ids=["plain", "causal", "alibi+softcap+key_lengths", "window"],
)
@pytest.mark.parametrize("backend", cpu_backends())
def test_forward_backward_peak_memory_is_linear(backend, kwargs):
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, backend, json.dumps(kwargs)], capture_output=True, text=True, timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    assert growth > 0, "the measurement saw no allocation at all"  # out and the gradients are new memory
    assert growth < _LXS_FLOAT32 / 4, f"peak RSS grew {growth / 2**20:.1f} MiB (bound {_LXS_FLOAT32 / 4 / 2**20:.0f} MiB)"
