"""The ``triton`` backend sends decode steps of the regular ``scaled_dot_product_attention`` (few query
rows, many keys, no gradient wanted) to the KV cache's split-KV kernel (``backends/triton_decode.py``).
These check that it takes exactly the calls it computes as the regular kernel would, and that its
results hold the tolerance policy with each feature, GQA and key splits merged through their lse."""

from __future__ import annotations

import pytest
import torch
from conftest import check_attention, rand, serves

import fused_attention
from fused_attention.backends import BACKENDS, triton_decode
from fused_attention.inputs import canonicalize

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    BACKENDS["triton"].unavailable_reason() is not None, reason=str(BACKENDS["triton"].unavailable_reason())
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, HQ, HKV, S, E = 2, 8, 2, 300, 16


def _qkv(lq=3, dtype=torch.float32, grad=False):
    q = rand(B, HQ, lq, E, dtype=dtype, requires_grad=grad).to(DEVICE)
    k, v = (rand(B, HKV, S, E, dtype=dtype, requires_grad=grad).to(DEVICE) for _ in range(2))
    return q, k, v


FEATURES = {
    "plain": {},
    "lower-right-causal": {"window_size": (-1, 0)},
    "window-softcap": {"window_size": (40, 0), "softcap": 2.0},
    "alibi": {"alibi_slopes": "slopes", "scale": 0.3},
    "key-lengths": {"key_lengths": torch.tensor([300, 131])},
    "sinks": {"sinks": "sinks"},
}


def _kwargs(name):
    kwargs = dict(FEATURES[name])
    if kwargs.get("alibi_slopes") == "slopes":
        kwargs["alibi_slopes"] = fused_attention.alibi_slopes(HQ).to(DEVICE)
    if kwargs.get("sinks") == "sinks":
        kwargs["sinks"] = torch.randn(HQ, dtype=torch.float64).float().to(DEVICE)
    if "key_lengths" in kwargs:
        kwargs["key_lengths"] = kwargs["key_lengths"].to(DEVICE)
    return kwargs


@pytest.fixture(params=[1, 3], ids=lambda n: f"{n}split")
def splits(request, monkeypatch):
    """1 split (the interpreter's default) and 3 (the GPU's kind: partial states merged through the lse)."""
    from fused_attention.kernels.triton import kvcache_decode

    monkeypatch.setattr(kvcache_decode, "default_splits", lambda *args: request.param)
    return request.param


@pytest.mark.parametrize("lq", [1, 5])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_decode_route_matches_the_reference(splits, feature, lq):
    q, k, v = _qkv(lq)
    kwargs = _kwargs(feature)
    assert triton_decode.decode_serves(canonicalize(q, k, v, enable_gqa=True, **kwargs))
    check_attention("triton", q, k, v, grad=False, enable_gqa=True, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_route_16bit(splits, dtype):
    if not serves("triton", dtype):
        pytest.skip(f"triton does not serve {dtype} here")
    q, k, v = _qkv(2, dtype)
    check_attention("triton", q, k, v, grad=False, enable_gqa=True, window_size=(-1, 0))


def test_decode_route_gives_the_regular_kernels_result(splits):
    """Routed and regular (the same call with a gradient wanted) agree within float32 rounding."""
    q, k, v = _qkv(4)
    routed = fused_attention.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="triton", return_lse=True)
    q.requires_grad_()
    regular = fused_attention.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="triton", return_lse=True)
    # The two kernels sum the same float32 terms in another order: a few ulps apart (measured at most
    # 1.5e-7 on outputs below 0.4 and 4.8e-7, one ulp, on lse near 6, with 1 and 3 splits).
    torch.testing.assert_close(routed[0], regular[0].detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(routed[1], regular[1].detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "case",
    ["grad", "many-rows", "few-keys", "mask", "dropout", "top-left-causal", "key-lengths-window", "key-lengths-alibi"],
)
def test_decode_route_declines_what_it_would_compute_differently(case):
    lq = triton_decode.MAX_ROWS + 1 if case == "many-rows" else 2
    q, k, v = _qkv(lq, grad=case == "grad")
    if case == "few-keys":
        k, v = k[:, :, : triton_decode.MIN_KEYS - 1], v[:, :, : triton_decode.MIN_KEYS - 1]
    kwargs = {
        "mask": {"attn_mask": torch.ones(lq, S, dtype=torch.bool, device=DEVICE)},
        "dropout": {"dropout_p": 0.1},
        "top-left-causal": {"is_causal": True},
        "key-lengths-window": {"key_lengths": torch.tensor([300, 131], device=DEVICE), "window_size": (40, 0)},
        "key-lengths-alibi": {"key_lengths": torch.tensor([300, 131], device=DEVICE),
                              "alibi_slopes": torch.ones(HQ, device=DEVICE)},
    }.get(case, {})
    assert not triton_decode.decode_serves(canonicalize(q, k, v, enable_gqa=True, **kwargs))


def test_decode_route_leaves_modes_the_registered_op():
    """Under a dispatch mode (a tracer, fake tensors) the call goes through the registered op, which the
    mode sees; the route launches its kernel directly and would hide it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = _qkv(2)
    inputs = canonicalize(q, k, v, enable_gqa=True)
    assert triton_decode.decode_serves(inputs)
    with Record():
        assert not triton_decode.decode_serves(inputs)
        fused_attention.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="triton")
    assert any("triton_attention" in name for name in seen), seen
