"""Hypothesis: random feature combinations and sizes, a few hundred derandomized cases per run."""

from __future__ import annotations

import torch
from conftest import check_attention, cpu_backends, rand
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_MASK_KINDS = ["none", "causal", "bool", "float", "lower_right"]


@st.composite
def configs(draw):
    hkv = draw(st.sampled_from([1, 2, 3]))
    return {
        "backend": draw(st.sampled_from(cpu_backends())),
        "batch": draw(st.integers(1, 2)),
        "hkv": hkv,
        "groups": draw(st.sampled_from([1, 2])),
        "seq_q": draw(st.integers(1, 40)),
        "seq_k": draw(st.integers(1, 40)),
        "head_dim": draw(st.sampled_from([8, 16, 40, 72])),
        "value_dim": draw(st.sampled_from([None, 8, 24])),
        "mask": draw(st.sampled_from(_MASK_KINDS)),
        "window": draw(st.one_of(st.none(), st.tuples(st.integers(-1, 12), st.integers(-1, 12)))),
        "alibi": draw(st.booleans()),
        "softcap": draw(st.one_of(st.none(), st.floats(0.5, 30.0))),
        "key_lengths": draw(st.booleans()),
        "scale": draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(configs())
def test_random_configuration(cfg):
    gen = torch.Generator().manual_seed(cfg["seed"])
    hq, dt, b = cfg["hkv"] * cfg["groups"], cfg["dtype"], cfg["batch"]
    lq, lk, d = cfg["seq_q"], cfg["seq_k"], cfg["head_dim"]
    q = rand(b, hq, lq, d, dtype=dt, requires_grad=True, gen=gen)
    k = rand(b, cfg["hkv"], lk, d, dtype=dt, requires_grad=True, gen=gen)
    v = rand(b, cfg["hkv"], lk, cfg["value_dim"] or d, dtype=dt, requires_grad=True, gen=gen)
    kwargs = {"enable_gqa": cfg["groups"] > 1, "window_size": cfg["window"], "softcap": cfg["softcap"],
              "scale": cfg["scale"]}
    if cfg["mask"] == "causal":
        kwargs["is_causal"] = True
    elif cfg["mask"] == "bool":
        kwargs["attn_mask"] = torch.rand(b, 1, lq, lk, generator=gen) > 0.2
    elif cfg["mask"] == "float":
        kwargs["attn_mask"] = rand(lq, lk, dtype=dt, requires_grad=True, gen=gen)
    elif cfg["mask"] == "lower_right":
        from torch.nn.attention.bias import causal_lower_right

        kwargs["attn_mask"] = causal_lower_right(lq, lk)
    if cfg["alibi"]:
        kwargs["alibi_slopes"] = torch.rand(hq, generator=gen)
    if cfg["key_lengths"]:
        kwargs["key_lengths"] = torch.randint(0, lk + 1, (b,), generator=gen)
    check_attention(cfg["backend"], q, k, v, **kwargs)
