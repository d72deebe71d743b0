"""The two ceilings of the GPU at hand, measured before anything is compared with them: device memory
bandwidth (a device-to-device copy, bytes read plus written) and the bfloat16 matrix rate (an
8192 x 8192 x 8192 product on random data), each the median of timed repeats after a warm-up.

    python benchmarks/gpu_ceilings.py
"""

from __future__ import annotations

import torch
from triton.testing import do_bench


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_ceilings: needs a CUDA GPU")
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
    src = torch.randn(2**28, device="cuda")  # 1 GiB of float32: far past the L2
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, quantiles=[0.5])
    print(f"copy: {2 * src.numel() * src.element_size() / ms / 1e6:.0f} GB/s (read + write, median {ms:.3f} ms)")
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, quantiles=[0.5])
    print(f"bf16 matmul {n}^3: {2 * n**3 / ms / 1e9:.0f} TFLOP/s (median {ms:.3f} ms)")


if __name__ == "__main__":
    main()
