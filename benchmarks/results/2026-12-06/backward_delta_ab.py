"""Forward + backward on the cpu backend at three shapes, median of 9 calls each: run alternately with the
trees to compare first on the path (the centered delta's cost, CHANGELOG and triton-f32-dominant-key.md):
``python backward_delta_ab.py <tree>``, 2 threads."""

import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
import fused_attention as fa

torch.set_num_threads(2)
CASES = [((8, 12, 128, 64), torch.float32, False), ((1, 8, 2048, 64), torch.float32, True),
         ((4, 16, 256, 128), torch.bfloat16, False)]
results = []
for shape, dtype, causal in CASES:
    q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
    up = torch.randn(*shape, dtype=dtype)

    def step(q=q, k=k, v=v, up=up, causal=causal):
        out = fa.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu")
        torch.autograd.grad(out, (q, k, v), up)

    for _ in range(3):
        step()
    times = []
    for _ in range(9):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    results.append(f"{shape}{' causal' if causal else ''} {str(dtype)[6:]} {times[4] * 1e3:.2f} ms")
print(sys.argv[1], " | ".join(results))
