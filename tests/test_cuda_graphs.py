"""CUDA graph capture of an attention call: ``torch.cuda.graph`` and ``torch.compile(mode="reduce-overhead")``.

GPU only (skipped without one; run on a lent GPU by ``benchmarks/gpu_check.sh``). A captured call
replays on new input values written into the captured tensors and gives what an eager call gives.
Dropout's seed is drawn on the host when the call is captured, so every replay applies the same
dropout mask: the last test pins that documented behaviour.
"""

from __future__ import annotations

import pytest
import torch

import fused_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPE = (2, 4, 128, 64)


def _inputs(dtype=torch.float16):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(SHAPE, device="cuda", dtype=dtype, generator=g) for _ in range(3)]


def _capture(fn, *args):
    """Warms ``fn`` up on a side stream (compiles and autotunes outside the capture), then captures it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    return graph, out


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"window_size": (32, 0), "softcap": 30.0}])
def test_cuda_graph_replays_new_inputs(kwargs):
    q, k, v = _inputs()

    def call(q, k, v):
        return fused_attention.scaled_dot_product_attention(q, k, v, **kwargs)

    graph, out = _capture(call, q, k, v)
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device="cuda", dtype=t.dtype, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, call(q, k, v), rtol=0, atol=0)


def test_compile_reduce_overhead():
    q, k, v = _inputs()

    @torch.compile(mode="reduce-overhead", fullgraph=True)
    def call(q, k, v):
        return fused_attention.scaled_dot_product_attention(q, k, v, is_causal=True)

    for _ in range(3):  # warm-up runs, then replays of the recorded graph
        out = call(q, k, v)
    expected = fused_attention.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_dropout_under_capture_replays_one_mask():
    q, k, v = _inputs()

    def call(q, k, v):
        return fused_attention.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    graph, out = _capture(call, q, k, v)
    graph.replay()
    first = out.clone()
    graph.replay()
    torch.testing.assert_close(out, first, rtol=0, atol=0)  # the seed was fixed at capture
    assert not torch.equal(call(q, k, v), call(q, k, v))  # eager calls draw a new seed each time
