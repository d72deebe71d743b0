"""The test machinery itself: the tolerance policy rejects what it must, and the shared check's
float32-intermediates bound tells float32 arithmetic from 16-bit arithmetic."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import FLOAT32_ARITHMETIC, _check_against_reference, _sample, assert_policy, rand

from fused_attention.reference import reference_attention


def test_policy_rejects_infinities_of_the_wrong_sign():
    ref = torch.tensor([float("-inf"), 1.0], dtype=torch.float64)
    assert_policy(ref.float(), ref.float(), ref, 2, "same")
    with pytest.raises(AssertionError, match="wrong sign"):
        assert_policy(torch.tensor([float("inf"), 1.0]), ref.float(), ref, 2, "sign")


def test_policy_rejects_nan_and_missing_infinities():
    ref = torch.tensor([float("-inf"), 1.0], dtype=torch.float64)
    with pytest.raises(AssertionError, match="infinities differ"):
        assert_policy(torch.tensor([0.0, 1.0]), ref.float(), ref, 2, "missing")
    with pytest.raises(AssertionError, match="max error"):
        assert_policy(torch.tensor([float("-inf"), float("nan")]), ref.float(), ref, 2, "nan")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_bound_rejects_16bit_arithmetic(dtype):
    """The reference computed entirely in 16-bit passes the ordinary policy (its own bound) but not the
    bound that backends promising float32 arithmetic are held to."""
    assert "torch" in FLOAT32_ARITHMETIC
    q, k, v = (rand(2, 4, 37, 40, dtype=dtype, requires_grad=True) for _ in range(3))
    kwargs = {"is_causal": True}

    def sixteen_bit(return_lse=False):
        out, lse = reference_attention(q, k, v, **kwargs)
        return (out, lse.float()) if return_lse else out.detach()

    _check_against_reference("a 16-bit backend", sixteen_bit, reference_attention, {"q": q, "k": k, "v": v},
                             kwargs, grad=True)
    with pytest.raises(AssertionError, match="float32 intermediates"):
        _check_against_reference("torch", sixteen_bit, reference_attention, {"q": q, "k": k, "v": v},
                                 kwargs, grad=True)


def test_sample_keeps_every_family_evenly():
    class Item:
        def __init__(self, module, name):
            self.module, self.originalname = types.SimpleNamespace(__name__=module), name

    items = [Item("a", "f") for _ in range(10)] + [Item("a", "g") for _ in range(2)] + [Item("b", "f")]
    kept = _sample(items, 3)
    assert [items.index(i) for i in kept] == [0, 4, 9, 10, 11, 12]
