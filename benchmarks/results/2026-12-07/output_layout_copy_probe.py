"""Where the contiguous output's cost goes: the kernel alone, and the kernel followed by transformers'
.transpose(1, 2).contiguous(), with the output contiguous (AB_CONTIGUOUS set) or in q's layout. Needed
the session's temporary build, as output_layout_call_ab.py (with the code as committed both sides run
the same code)."""
import os

import torch
from torch.utils.benchmark import Timer

import fused_attention as fa

b, n, h, d = 8, 128, 12, 64
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(b, n, 3 * h * d, dtype=dtype)
    q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in x.split(h * d, -1))
    names = {"fa": fa, "q": q, "k": k, "v": v}
    for _ in range(2):
        for contiguous in (True, False):
            if contiguous:
                os.environ["AB_CONTIGUOUS"] = "1"
            else:
                os.environ.pop("AB_CONTIGUOUS", None)
            kernel = Timer("fa.scaled_dot_product_attention(q, k, v)", globals=names, num_threads=2)
            both = Timer("fa.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous()", globals=names,
                         num_threads=2)
            t1 = kernel.blocked_autorange(min_run_time=0.5).median * 1e3
            t2 = both.blocked_autorange(min_run_time=0.5).median * 1e3
            print(dtype, "contiguous" if contiguous else "layout", f"kernel {t1:.3f} ms, kernel+copy {t2:.3f} ms")
