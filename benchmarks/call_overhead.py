"""Per-call cost of small attention calls: ours against torch's SDPA, interleaved in one process.

What a decode step or a tiny batch pays on the host before (and around) the kernel:

- ``sdpa``: ``scaled_dot_product_attention(q, k, v)`` with q, k, v ``(1, 1, 16, 64)`` float32, no grad,
  then with inputs that require grad (the forward timed); and a decode-shaped call (one query, GQA 8/2,
  a 600-key cache); the tiny call again through every Python layer (the short path of
  ``backends/plain_call.py`` off), and also with the CPU op's direct entry off (``ops/eager.py``);
- ``varlen``: ``varlen_attention`` over two packed sequences of 8 tokens;
- ``hf``: the Hugging Face attention function (``fused_attention_forward``) against transformers'
  ``sdpa_attention_forward`` on the tiny call;
- ``kvcache``: a decode step with a KV cache (one query, GQA 8/2, head dim 64, 600 cached keys): append
  one token with RoPE and attend, through ``attention_with_kvcache`` (contiguous ``(B, H, S, D)`` cache,
  and paged with pages of 16), against the same step written with torch (rotate q and k, ``index_copy_``
  into a static cache, SDPA over the filled part); then the step without RoPE (the caller rotated the
  token: the calls ``attention_with_kvcache``'s short path serves), also in FlashAttention's layout;
- ``triton-host``: the Triton backend's host side (canonicalize, dispatch, the custom op, the launch
  arguments) with the kernel launch replaced by a no-op, under ``TRITON_INTERPRET=1`` on the CPU.

One torch thread (the kernels at these sizes are single-threaded; a shared machine's other load then
disturbs the timing least) unless ``--threads``; CPU time of the calling thread (``time.thread_time``)
or wall time with ``--wall``; medians of interleaved rounds.

    python benchmarks/call_overhead.py [--rounds 21] [--wall] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are imported

import torch
import torch.nn.functional as F

import fused_attention
from fused_attention.kvcache import plain_call as kvcache_plain


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, calls: int, clock) -> dict[str, float]:
    """Median microseconds per call of each function, blocks of ``calls`` calls interleaved ``rounds`` times."""
    for fn in fns.values():
        for _ in range(50):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            for _ in range(calls):
                fn()
            times[name].append((clock() - start) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def _rows(args) -> list[tuple[str, str, Callable, Callable]]:
    """(case, baseline name, torch's call, ours)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 16, 64, generator=g) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    dq, dk, dv = torch.randn(1, 8, 1, 64, generator=g), torch.randn(1, 2, 600, 64, generator=g), torch.randn(
        1, 2, 600, 64, generator=g)
    sdpa, ours = F.scaled_dot_product_attention, fused_attention.scaled_dot_product_attention
    rows = [
        ("tiny (1, 1, 16, 64), no grad", "torch sdpa", lambda: sdpa(q, k, v), lambda: ours(q, k, v)),
        ("tiny, inputs require grad (forward)", "torch sdpa", lambda: sdpa(qg, kg, vg), lambda: ours(qg, kg, vg)),
        ("decode: 1 query, GQA 8/2, 600 keys", "torch sdpa", lambda: sdpa(dq, dk, dv, enable_gqa=True),
         lambda: ours(dq, dk, dv, enable_gqa=True)),
    ]
    from fused_attention.backends import cpu_backend, plain_call

    eager_op = None if cpu_backend._OPS is None else cpu_backend._OPS.attention
    if plain_call._PLAIN is not None and eager_op is not None and eager_op.direct is not None:
        plain, direct = plain_call._PLAIN, eager_op.direct

        def without(short_path: bool, direct_entry: bool):
            def call():
                plain_call._PLAIN = plain if short_path else None
                eager_op.direct = direct if direct_entry else None  # the op called below autograd
                try:
                    return ours(q, k, v)
                finally:
                    plain_call._PLAIN, eager_op.direct = plain, direct

            return call

        rows.append(("tiny, no grad, every Python layer (short path off)", "ours (short path on)",
                     lambda: ours(q, k, v), without(False, True)))
        rows.append(("tiny, no grad, also the op through the dispatcher (short path, direct entry off)",
                     "ours (short path on)", lambda: ours(q, k, v), without(False, False)))
    pq, pk, pv = (torch.randn(16, 2, 64, generator=g) for _ in range(3))
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    per_seq = [(t[:8].transpose(0, 1), t[8:].transpose(0, 1)) for t in (pq, pk, pv)]
    rows.append((
        "varlen: 2 x 8 tokens, 2 heads", "torch sdpa per sequence",
        lambda: [sdpa(per_seq[0][i], per_seq[1][i], per_seq[2][i]) for i in range(2)],
        lambda: fused_attention.varlen_attention(pq, pk, pv, cu, cu, 8, 8),
    ))
    rows.extend(_kvcache_rows(g))
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        from fused_attention.integrations.huggingface import fused_attention_forward
    except ImportError:
        pass
    else:
        module = torch.nn.Module()
        module.is_causal = False
        rows.append(("HF attention function, tiny call", "transformers sdpa_attention_forward",
                     lambda: sdpa_attention_forward(module, q, k, v, None),
                     lambda: fused_attention_forward(module, q, k, v, None)))
    return rows


def _kvcache_rows(g: torch.Generator) -> list[tuple[str, str, Callable, Callable]]:
    """A decode step that appends one token (with RoPE, or rotated by the caller) to a cache of 600 keys and
    attends over 601; every call writes the same slot, so each repeats the same work."""
    filled, capacity, page = 600, 1024, 16
    q, k, v = torch.randn(1, 8, 1, 64, generator=g), torch.randn(1, 2, 1, 64, generator=g), torch.randn(
        1, 2, 1, 64, generator=g)
    kc, vc = torch.randn(1, 2, capacity, 64, generator=g), torch.randn(1, 2, capacity, 64, generator=g)
    k_pages = kc[0].unflatten(1, (capacity // page, page)).transpose(0, 1).contiguous()  # (pages, H, page, D)
    v_pages = vc[0].unflatten(1, (capacity // page, page)).transpose(0, 1).contiguous()
    table = torch.arange(capacity // page, dtype=torch.int32).unsqueeze(0)
    cos, sin = fused_attention.rotary_cos_sin(capacity, 64)
    seqlens, position = torch.tensor([filled], dtype=torch.int32), torch.tensor([filled])

    def rope(x):  # half-split, as transformers' rotate_half
        c, s = cos[position], sin[position]
        x1, x2 = x[..., :32], x[..., 32:]
        return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)

    def torch_step():
        kc.index_copy_(2, position, rope(k))
        vc.index_copy_(2, position, v)
        return F.scaled_dot_product_attention(rope(q), kc[:, :, : filled + 1], vc[:, :, : filled + 1], enable_gqa=True)

    def torch_append():  # keys and values rotated by the caller, as Hugging Face models do
        kc.index_copy_(2, position, k)
        vc.index_copy_(2, position, v)
        return F.scaled_dot_product_attention(q, kc[:, :, : filled + 1], vc[:, :, : filled + 1], enable_gqa=True)

    # FlashAttention's layout: (B, S, H, D) views of the same kind of cache, q and the new token
    q_s, k_s, v_s = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    k_pages_s, v_pages_s = k_pages.transpose(1, 2).contiguous(), v_pages.transpose(1, 2).contiguous()

    def no_rope_step():
        return fused_attention.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, layout="bhsd")

    def full_path_step():  # the short path off: every Python layer, the op through the dispatcher
        plain, kvcache_plain._PLAIN = kvcache_plain._PLAIN, None
        try:
            return no_rope_step()
        finally:
            kvcache_plain._PLAIN = plain

    step = {"cache_seqlens": seqlens, "rotary_cos": cos, "rotary_sin": sin, "layout": "bhsd"}
    return [
        ("kvcache decode step: append 1 token + RoPE, 600 keys, GQA 8/2", "torch (rope, index_copy_, sdpa)",
         torch_step, lambda: fused_attention.attention_with_kvcache(q, kc, vc, k, v, **step)),
        ("the same step, paged cache (pages of 16)", "torch (rope, index_copy_, sdpa)", torch_step,
         lambda: fused_attention.attention_with_kvcache(q, k_pages, v_pages, k, v, block_table=table, **step)),
        ("kvcache decode step without RoPE (rotated by the caller): append 1 token, 600 keys, GQA 8/2",
         "torch (index_copy_, sdpa)", torch_append, no_rope_step),
        ("the same step, the short path off", "ours (short path on)", no_rope_step, full_path_step),
        ("the same step, FlashAttention's layout (B, S, H, D), pages of 16", "torch (index_copy_, sdpa)",
         torch_append, lambda: fused_attention.attention_with_kvcache(q_s, k_pages_s, v_pages_s, k_s, v_s,
                                                                      cache_seqlens=seqlens, block_table=table)),
    ]


def _triton_host_rows():
    """Our triton path with the launch a no-op: the public call forced to it, and the backend's own part
    (canonical inputs to launch arguments, the part a CUDA call also runs: on CUDA automatic dispatch
    picks triton from its cache, while a forced call on the CPU re-probes the interpreter every time).
    Or the reason it cannot run here."""
    from fused_attention.backends import BACKENDS
    from fused_attention.inputs import canonicalize

    triton_backend = BACKENDS["triton"]
    q, k, v = (torch.randn(1, 1, 16, 64) for _ in range(3))
    reasons = triton_backend.not_supported_reasons(canonicalize(q, k, v))
    if reasons:
        return None, "; ".join(reasons)
    from fused_attention.kernels.triton import attention_launch

    attention_launch.run = lambda *args, **kwargs: None  # the host side only
    return {
        "public call, backend='triton'": lambda: fused_attention.scaled_dot_product_attention(q, k, v, backend="triton"),
        "canonicalize + triton backend (no dispatch)": lambda: triton_backend.attention(canonicalize(q, k, v)),
    }, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", action="store_true", help="wall time instead of the thread's CPU time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.thread_time
    print(f"torch {torch.__version__}, {args.threads} thread(s), {'wall' if args.wall else 'thread CPU'} time, "
          f"load average {os.getloadavg()[0]:.2f}; median us per call of {args.rounds} interleaved rounds\n")
    print("| call | baseline | baseline (us) | ours (us) | ours / baseline |\n|---|---|---|---|---|")
    for case, baseline, theirs, ours in _rows(args):
        t = interleaved({"theirs": theirs, "ours": ours}, args.rounds, args.calls, clock)
        print(f"| {case} | {baseline} | {t['theirs']:.1f} | {t['ours']:.1f} | {t['ours'] / t['theirs']:.2f}x |")
    hosts, reason = _triton_host_rows()
    if hosts is None:
        print(f"\ntriton host side: not measured ({reason})")
        return
    q, k, v = (torch.randn(1, 1, 16, 64) for _ in range(3))
    t = interleaved({"torch": lambda: F.scaled_dot_product_attention(q, k, v), **hosts}, args.rounds, args.calls,
                    clock)
    for name in hosts:
        print(f"| triton host side, launch a no-op, tiny call: {name} | torch sdpa (whole call) | "
              f"{t['torch']:.1f} | {t[name]:.1f} | {t[name] / t['torch']:.2f}x |")


if __name__ == "__main__":
    main()
