"""In-process A/B of the encoder layer's feed-forward block (record script, 2026-12-07).

torch's nn.TransformerEncoder (BERT-base layer sizes, 2 layers, batch 8 x 128) against two patched copies:
"before", whose layers run torch's own ``_ff_block`` (a fresh tensor for the ReLU), and "after", this
commit's block (ReLU fused into linear1 in inference; torch's block with autograd). Rounds interleave the
three; medians. Usage: python encoder_feed_forward_ab.py [rounds]
"""

import copy
import platform
import statistics
import sys
import time
import types

import torch
from torch import nn

import fused_attention

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
torch.manual_seed(0)
d = 768
ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 12, 4 * d, batch_first=True), 2, enable_nested_tensor=False)
after = copy.deepcopy(ref)
fused_attention.patch_model(after)
before = copy.deepcopy(after)
for layer in before.layers:
    layer._ff_block = types.MethodType(nn.TransformerEncoderLayer._ff_block, layer)
x = torch.randn(8, 128, d)
models = {"torch": ref, "before": before, "after": after}


def step(m):
    if m.training:
        m(x).sum().backward()
    else:
        with torch.no_grad():
            m(x)


print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
      f"{rounds} interleaved rounds, medians (ms); speedup = torch / variant")
print("| mode | torch (torch's fast path in eval) | before | after | before speedup | after speedup |")
print("|---|---|---|---|---|---|")
for mode in ("eval", "train"):
    times = {k: [] for k in models}
    for m in models.values():
        getattr(m, mode)()
        step(m)
    for _ in range(rounds):
        for k, m in models.items():
            t = time.perf_counter()
            step(m)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"| {mode} | {med['torch']:.1f} | {med['before']:.1f} | {med['after']:.1f} | "
          f"{med['torch'] / med['before']:.2f}x | {med['torch'] / med['after']:.2f}x |")
