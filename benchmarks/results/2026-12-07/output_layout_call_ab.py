"""In-process A/B of the output layout at transformers' attention call (needed the session's temporary
build, whose rule read AB_CONTIGUOUS at each call: set, every output and gradient was contiguous, as
before the change; with the code as committed both sides run the same code and print about 1.0x). q, k, v are viewed from one (B, N, (H + 2 Hkv) D) projection and transposed; the
output goes back through fused_attention_forward's .transpose(1, 2).contiguous(), gradients through both.
usage: output_layout_call_ab.py [ROUNDS]"""
import os
import statistics
import sys

import torch
from torch.utils.benchmark import Timer

from fused_attention.integrations.huggingface import fused_attention_forward

torch.manual_seed(0)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5


class Layer(torch.nn.Module):
    is_causal = False


def case(b, h, hkv, n, d, dtype, causal, train):
    x = torch.randn(b, n, (h + 2 * hkv) * d, dtype=dtype, requires_grad=train)
    layer = Layer().eval()
    layer.is_causal = causal
    grad = torch.randn(b, n, h, d, dtype=dtype)

    def run():
        q, k, v = x.split([h * d, hkv * d, hkv * d], -1)
        q, k, v = (t.view(b, n, -1, d).transpose(1, 2) for t in (q, k, v))
        out, _ = fused_attention_forward(layer, q, k, v, None)
        if train:
            out.backward(grad)
            x.grad = None

    return run


CASES = [
    ("BERT 8x12x128x64 fwd", (8, 12, 12, 128, 64, torch.float32, False, False)),
    ("BERT 8x12x128x64 fwd bf16", (8, 12, 12, 128, 64, torch.bfloat16, False, False)),
    ("BERT 8x12x128x64 fwd+bwd", (8, 12, 12, 128, 64, torch.float32, False, True)),
    ("Llama 1x8/2x2048x64 causal fwd", (1, 8, 2, 2048, 64, torch.float32, True, False)),
    ("Llama 1x8/2x2048x64 causal fwd+bwd", (1, 8, 2, 2048, 64, torch.float32, True, True)),
    ("1x12x128x64 fwd (one sentence)", (1, 12, 12, 128, 64, torch.float32, False, False)),
]
print("| call | contiguous out (ms) | out in q's layout (ms) | speedup |")
print("|---|---|---|---|")
for name, args in CASES:
    run = case(*args)
    times = {"contiguous": [], "layout": []}
    for r in range(rounds):
        for key in ("contiguous", "layout") if r % 2 == 0 else ("layout", "contiguous"):
            if key == "contiguous":
                os.environ["AB_CONTIGUOUS"] = "1"
            else:
                os.environ.pop("AB_CONTIGUOUS", None)
            timer = Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads())
            times[key].append(timer.blocked_autorange(min_run_time=0.4).median * 1e3)
    a, b = statistics.median(times["contiguous"]), statistics.median(times["layout"])
    print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.3f}x |")
    os.environ.pop("AB_CONTIGUOUS", None)
