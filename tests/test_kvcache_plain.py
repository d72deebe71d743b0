"""``attention_with_kvcache``'s short path on the cpu backend (``fused_attention/kvcache/plain_call.py``, the
extension's ``kvcache_plain``): the calls it serves give the full path's output, lse and caches bit for bit
and bump the caches' version counters as the op does; every call the full path rejects, every argument it
leaves out and anything that intercepts calls goes to the full path (which raises its own errors)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import cpu_backends
from test_kvcache import make_case, to_layout
from torch.utils._python_dispatch import TorchDispatchMode

import fused_attention as fa
from fused_attention.kvcache import plain_call

pytestmark = pytest.mark.skipif(
    "cpu" not in cpu_backends() or plain_call._PLAIN is None, reason="the cpu backend's short entry is not built"
)


@pytest.fixture
def served(monkeypatch):
    """The short entry's answers during the test: True where it served a call, False where it declined,
    "raised" where it raised (it must decline whatever the full path rejects)."""
    answers: list[bool | str] = []
    real = plain_call._PLAIN

    def spy(*args):
        try:
            out = real(*args)
        except Exception:
            answers.append("raised")
            raise
        answers.append(out is not None)
        return out

    monkeypatch.setattr(plain_call, "_PLAIN", spy)
    return answers


def _full_path(monkeypatch):
    monkeypatch.setattr(plain_call, "_PLAIN", None)


def _strided(t):
    """``t``'s values in memory of another order: the other layout's (B, H, S, D) / (B, S, H, D) order with every
    row padded (no unit stride between rows)."""
    wide = torch.zeros(*t.transpose(1, 2).shape[:3], t.shape[3] + 3, dtype=t.dtype)
    view = wide[..., 1: t.shape[3] + 1].transpose(1, 2)
    view.copy_(t)
    return view


def _call(case, seqlens, extra=None, strided=False):
    """``attention_with_kvcache`` on fresh copies of the case's caches: (result, caches after). strided: q, k
    and v in strided memory (_strided)."""
    layout = case["layout"]
    k_cache, v_cache = to_layout(case["k_cache"], layout), to_layout(case["v_cache"], layout)
    arrange = _strided if strided else (lambda t: t)
    kwargs = {"cache_seqlens": seqlens, "block_table": case["block_table"], "is_causal": case["is_causal"],
              "scale": case["scale"], "window_size": case["window_size"], "alibi_slopes": case["alibi_slopes"],
              "softcap": case["softcap"], "cache_batch_idx": case["batch_idx"], "cache_leftpad": case["leftpad"],
              "return_lse": True, "layout": layout, **(extra or {})}
    with torch.no_grad():
        q, k, v = (None if t is None else arrange(to_layout(t, layout)) for t in (case["q"], case["k"], case["v"]))
        out = fa.attention_with_kvcache(q, k_cache, v_cache, k, v, **kwargs)
    return out, (k_cache, v_cache)


def _matches_full_path(case, seqlens, extra, monkeypatch, served, strided=False, what=""):
    """The short path serves the call, with the full path's output (values, dtype, strides), lse and caches."""
    served.clear()
    (out, lse), caches = _call(case, seqlens, extra, strided)
    assert served == [True], f"{what}: the short path declined"
    with monkeypatch.context() as m:
        _full_path(m)
        (out_full, lse_full), caches_full = _call(case, seqlens, extra, strided)
    assert out.dtype == out_full.dtype and out.shape == out_full.shape and out.stride() == out_full.stride()
    assert torch.equal(out, out_full) and torch.equal(lse, lse_full), what
    assert all(torch.equal(a, b) for a, b in zip(caches, caches_full)), f"{what}: the caches differ"


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CASES = [
    pytest.param(index, layout, page, seq_q, append, id=f"{layout}-p{page}-q{seq_q}-{'append' if append else 'read'}")
    for index, (layout, page, seq_q, append) in enumerate(
        itertools.product(["bshd", "bhsd"], [None, 3, 16], [1, 4], [False, True]))
]


@pytest.mark.parametrize("index,layout,page_size,seq_q,append", CASES)
def test_short_path_matches_the_full_path_bit_for_bit(index, layout, page_size, seq_q, append, served, monkeypatch):
    """Every dtype, both layouts, contiguous and paged caches, lengths as int32 and int64 tensors, one int or
    none (full caches), causal or not, a scale, windows, ALiBi, softcap, sinks, with and without an append,
    which may apply RoPE (half-split or interleaved, every feature or half of them; a window puts the query
    rows in order); q, k and v contiguous or strided (the output's layout follows q's)."""
    dtype = DTYPES[index % len(DTYPES)]
    features = [(), ("causal",), ("scale",), ("causal", "scale"), ("window",), ("causal", "window", "softcap"),
                ("alibi",), ("alibi", "softcap", "scale")][index // 2 % 8]
    case = make_case(index, layout=layout, page_size=page_size, seq_q=seq_q, append=append, group=4, num_splits=0,
                     dtype=dtype, features=features, length=200, dims=(64, 32))
    lengths = case["seqlens"]
    kinds = {"int32": lengths, "int64": lengths.long(), "int": int(lengths[1])}
    if not append:
        kinds["None"] = None  # every cache full
    ropes = {"no rope": {"sinks": torch.randn(8)} if index % 3 == 0 else {}}
    if append:  # fused RoPE: half-split over every feature, interleaved over half of them
        full_cos, full_sin = fa.rotary_cos_sin(256, 64, dtype=torch.float32)
        half_cos, half_sin = fa.rotary_cos_sin(256, 32, dtype=torch.float64)
        ropes["rope"] = {"rotary_cos": full_cos, "rotary_sin": full_sin}
        ropes["rope interleaved partial"] = {"rotary_cos": half_cos, "rotary_sin": half_sin, "rotary_interleaved": True}
    for (kind, seqlens), (rope, extra), strided in itertools.product(kinds.items(), ropes.items(), [False, True]):
        _matches_full_path(case, seqlens, extra, monkeypatch, served, strided, f"{kind}, {rope}, strided={strided}")


@pytest.mark.parametrize("append", [False, True])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("features,page_size", [
    (("leftpad",), None), (("leftpad", "causal", "window"), 16), (("batch_idx",), None),
    (("batch_idx", "leftpad", "causal"), None),
], ids=lambda x: "-".join(x) if isinstance(x, tuple) else f"p{x}")
def test_cache_rows_and_left_padding_match_the_full_path(features, page_size, layout, append, served, monkeypatch):
    """cache_batch_idx (rows of a larger contiguous cache) and cache_leftpad, with RoPE when appending."""
    case = make_case(3, layout=layout, page_size=page_size, seq_q=2, append=append, group=2, num_splits=0,
                     dtype=torch.float32, features=features, length=40, dims=(32, 16))
    cos, sin = fa.rotary_cos_sin(64, 32)
    rope = {"rotary_cos": cos, "rotary_sin": sin} if append else {}
    _matches_full_path(case, case["seqlens"], rope, monkeypatch, served)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_windowed_steps_rotate_query_rows_in_order(layout, served, monkeypatch):
    """A window without causal puts query row i at its own position for RoPE (as FlashAttention), which
    three appended rows show."""
    case = make_case(7, layout=layout, page_size=None, seq_q=3, append=True, group=2, num_splits=0,
                     dtype=torch.float32, length=48, dims=(32, 32))
    case["window_size"] = (5, 1)
    cos, sin = fa.rotary_cos_sin(64, 32)
    _matches_full_path(case, case["seqlens"], {"rotary_cos": cos, "rotary_sin": sin}, monkeypatch, served)


def test_defaults_spelled_out_take_the_short_path(served):
    """FlashAttention's defaults (window_size=(-1, -1), softcap=0.0, rotary_interleaved=True without RoPE),
    num_splits=1, a window as a list and a softcap too large to cap anything change nothing."""
    case = make_case(1, layout="bshd", page_size=16, seq_q=1, append=True, group=2, num_splits=0,
                     dtype=torch.float32, length=64, dims=(32, 32))
    plain, _ = _call(case, case["seqlens"])
    extras = ({"window_size": (-1, -1)}, {"window_size": [-1, -1]}, {"softcap": 0.0}, {"softcap": 0},
              {"softcap": 1e30}, {"num_splits": 1}, {"rotary_interleaved": True})
    for extra in extras:
        out, _ = _call(case, case["seqlens"], extra)
        assert torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1]), extra
    assert served == [True] * (len(extras) + 1)


@pytest.mark.parametrize("extra", [
    {"num_splits": 2}, {"backend": "cpu"}, {"backend": "torch"}, {"num_splits": True},
], ids=lambda e: f"{next(iter(e))}={next(iter(e.values()))!r:.20}")
def test_other_arguments_take_the_full_path(extra, served):
    case = make_case(2, layout="bshd", page_size=None, seq_q=1, append=False, group=2, num_splits=0,
                     dtype=torch.float32, length=40, dims=(16, 16))
    try:
        _call(case, case["seqlens"], extra)
    except (TypeError, ValueError):
        pass  # (the full path's rejection of a bool num_splits)
    assert served == [], "the short entry was called"


def _bad_calls():
    """Calls the full path rejects: name -> (case changes, cache_seqlens, extra kwargs)."""
    full = torch.tensor([62, 62, 62], dtype=torch.int32)
    return {
        "past capacity": (None, full, {}),
        "past capacity (int)": (None, 63, {}),
        "negative length": (None, torch.tensor([3, -1, 0], dtype=torch.int32), {}),
        "length too wide (int)": (None, 2**70, {}),
        "float lengths": (None, torch.tensor([1.0, 2.0, 3.0]), {}),
        "lengths of another batch": (None, torch.tensor([1, 2], dtype=torch.int32), {}),
        "page outside the pool": ("bad_page", None, {}),
        "page appended twice": ("shared_page", None, {}),
        "int64 block table": ("int64_table", None, {}),
        "caches one tensor": ("aliased", None, {}),
        "caches one tensor, nothing appended": ("aliased_empty", None, {}),
        "k_cache of another dtype": ("k_cache_f64", None, {}),
        "k of another shape": ("k_short", None, {}),
        "query heads not a multiple": ("q_heads", None, {}),
        "q requires grad": ("q_grad", None, {}),
        "no v": ("no_v", None, {}),
        "scale a string": (None, None, {"scale": "0.5"}),
        "is_causal an int": (None, None, {"is_causal": 1}),
        "layout unknown": (None, None, {"layout": "sbhd"}),
        "cache rows with a block table": ("rows_with_table", None, {"cache_batch_idx": torch.tensor([0, 1, 2], dtype=torch.int32)}),
        "cache row outside the cache": (None, None, {"cache_batch_idx": torch.tensor([0, 3, 1], dtype=torch.int32)}),
        "cache row named twice": (None, None, {"cache_batch_idx": torch.tensor([0, 1, 1], dtype=torch.int32)}),
        "cache rows as an int": (None, None, {"cache_batch_idx": 1}),
        "cache rows as floats": (None, None, {"cache_batch_idx": torch.tensor([0.0, 1.0, 2.0])}),
        "left padding past the length": (None, None, {"cache_leftpad": torch.tensor([0, 6, 0], dtype=torch.int32)}),
        "negative left padding": (None, None, {"cache_leftpad": torch.tensor([0, -1, 0], dtype=torch.int32)}),
        "left padding of another batch": (None, None, {"cache_leftpad": torch.tensor([0, 1], dtype=torch.int32)}),
        "window edge below -1": (None, None, {"window_size": (-2, 0)}),
        "window of three": (None, None, {"window_size": (1, 2, 3)}),
        "softcap negative": (None, None, {"softcap": -1.0}),
        "softcap a bool": (None, None, {"softcap": True}),
        "slopes of another shape": (None, None, {"alibi_slopes": torch.ones(3)}),
        "slopes float64": (None, None, {"alibi_slopes": torch.ones(4, dtype=torch.float64)}),
        "sinks NaN": (None, None, {"sinks": torch.tensor([0.0, float("nan"), 0.0, 0.0])}),
        "sinks want a gradient": (None, None, {"sinks": torch.zeros(4, requires_grad=True)}),
        "rope tables too short": (None, None, {"rotary_cos": torch.ones(9, 8), "rotary_sin": torch.zeros(9, 8)}),
        "rope tables wider than the head": (None, None, {"rotary_cos": torch.ones(64, 9), "rotary_sin": torch.ones(64, 9)}),
        "rope tables of two shapes": (None, None, {"rotary_cos": torch.ones(64, 8), "rotary_sin": torch.ones(64, 4)}),
        "rope without sin": (None, None, {"rotary_cos": torch.ones(64, 8)}),
        "rope tables of ints": (None, None, {"rotary_cos": torch.ones(64, 8, dtype=torch.int32),
                                             "rotary_sin": torch.ones(64, 8, dtype=torch.int32)}),
    }


_TABLE_FAULTS = ("bad_page", "shared_page", "int64_table", "rows_with_table")  # (exist only with a block table)


@pytest.mark.parametrize("paged,name", [
    (paged, name) for paged in (False, True) for name, (change, _, _) in _bad_calls().items()
    if paged or change not in _TABLE_FAULTS
])
def test_rejected_calls_raise_the_full_paths_errors(name, paged, served, monkeypatch):
    change, seqlens, extra = _bad_calls()[name]
    gen = torch.Generator().manual_seed(0)
    page = 8 if paged else None
    capacity = 64 if paged else 62
    k_cache = torch.randn(8 if paged else 3, page or capacity, 2, 16, generator=gen)
    v_cache = torch.randn_like(k_cache)
    table = torch.arange(6, dtype=torch.int32).view(3, 2) if paged else None
    q, k, v = torch.randn(3, 1, 4, 16, generator=gen), torch.randn(3, 1, 2, 16, generator=gen), torch.randn(3, 1, 2, 16)
    lengths = torch.tensor([0, 5, 9], dtype=torch.int32) if seqlens is None else seqlens
    if change == "bad_page":
        table[1, 1] = 8
        lengths = torch.tensor([0, 12, 9], dtype=torch.int32)
    elif change == "shared_page":
        table[2, 1] = table[1, 1]
        lengths = torch.tensor([0, 12, 12], dtype=torch.int32)  # both append to page 3's slot 4
    elif change == "int64_table":
        table = table.long()
    elif change == "aliased":
        v_cache = k_cache
    elif change == "aliased_empty":  # (the op refuses it, after Python's checks pass)
        v_cache, k, v = k_cache, k[:, :0], v[:, :0]
    elif change == "k_cache_f64":
        k_cache = k_cache.double()
    elif change == "k_short":
        k = k[..., :8]
    elif change == "q_heads":
        q = torch.randn(3, 1, 3, 16)
    elif change == "q_grad":
        q.requires_grad_(True)
    elif change == "no_v":
        v = None
    kwargs = {"cache_seqlens": lengths, "block_table": table, **extra}

    def run():
        k_before, v_before = k_cache.clone(), v_cache.clone()
        with pytest.raises(Exception) as info:
            fa.attention_with_kvcache(q, k_cache, v_cache, k, v, **kwargs)
        assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before), "the caches were written"
        return type(info.value), str(info.value)

    short = run()
    assert all(answer is False for answer in served), f"the short path did not decline: {served}"
    with monkeypatch.context() as m:
        _full_path(m)
        assert run() == short


def test_append_bumps_the_caches_versions(served):
    """As the op's ADInplaceOrView kernel: once per call, under no_grad and inference_mode, and a backward
    that saved a tensor sharing a cache's storage is refused; inference tensors have no counter."""
    a = torch.randn(2, 16, 2, 8, requires_grad=True)
    saved = a.exp()
    k_cache, v_cache = saved.detach(), torch.randn(2, 16, 2, 8)
    q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    versions = (k_cache._version, v_cache._version)
    with torch.no_grad():
        fa.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=3)
    with torch.inference_mode():
        fa.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=4)
    with torch.no_grad():
        fa.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=5)  # (no append: no bump)
    assert (k_cache._version, v_cache._version) == (versions[0] + 2, versions[1] + 2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()
    with torch.inference_mode():
        k_cache, v_cache = torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
        fa.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=3)
    assert served == [True] * 4


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_and_profilers_see_the_op(served):
    """A dispatch mode sees the op (the short entry declines it); a profiler records the short path's call
    under the op's name."""
    q, k_cache, v_cache = torch.randn(1, 1, 4, 8), torch.randn(1, 32, 2, 8), torch.randn(1, 32, 2, 8)
    with torch.no_grad(), _Recorder() as mode:
        fa.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=9)
    assert any("kvcache_attention" in op for op in mode.ops) and served == [False]
    with torch.no_grad(), torch.profiler.profile() as prof:
        fa.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=9)
    assert served == [False, True]
    assert "fused_attention::kvcache_attention" in {e.name for e in prof.events()}


@pytest.mark.parametrize("seq_q", [1, 3])
def test_profilers_see_the_full_paths_ops(seq_q, served, monkeypatch):
    """With RoPE and an append, the short path records the ops the full path calls (one rotary_qk for a step
    of one row, rotary twice for three rows that are not causal)."""
    q, k_cache, v_cache = torch.randn(1, seq_q, 4, 8), torch.randn(1, 32, 2, 8), torch.randn(1, 32, 2, 8)
    k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    cos, sin = fa.rotary_cos_sin(32, 8)

    def ops():
        with torch.no_grad(), torch.profiler.profile() as prof:
            fa.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=9, rotary_cos=cos, rotary_sin=sin)
        return sorted(e.name for e in prof.events() if e.name.startswith("fused_attention::"))

    short = ops()
    assert served == [True]
    with monkeypatch.context() as m:
        _full_path(m)
        full = ops()
    assert "fused_attention::kvcache_append_attention_" in short
    assert short == full


def test_below_ad_inplace_or_view_takes_the_full_path(served):
    """Below ADInplaceOrView (torch's internal guard) the op bumps no version counter: the short path, which
    would, declines."""
    q, k_cache, v_cache = torch.randn(1, 1, 4, 8), torch.randn(1, 32, 2, 8), torch.randn(1, 32, 2, 8)
    k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    with torch.no_grad(), torch._C._AutoDispatchBelowADInplaceOrView():
        fa.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=3)
    assert served == [False]
