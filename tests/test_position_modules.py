"""The positional modules as drop-ins, and RoPE scalings against transformers' own initialisation."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from conftest import rand
from torch import nn

import fused_attention
from fused_attention.errors import AttentionArgumentError
from fused_attention.nn import ALiBi, PositionalEncoding, RotaryEmbedding


class ClassicPositionalEncoding(nn.Module):
    """The module as written in PyTorch's Transformer tutorial (sequence-first)."""

    def __init__(self, d_model, dropout=0.1, max_len=5000):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x):
        return self.dropout(x + self.pe[: x.size(0)])


def test_positional_encoding_loads_classic_state_and_matches():
    classic = ClassicPositionalEncoding(64, dropout=0.0, max_len=600).eval()
    ours = PositionalEncoding(64, max_len=600).eval()
    ours.load_state_dict(classic.state_dict())
    classic.load_state_dict(ours.state_dict())
    assert ours.pe.shape == (600, 1, 64) and ours.uses_formula()
    x = rand(500, 3, 64)
    torch.testing.assert_close(ours(x), classic(x), rtol=0, atol=5e-4)  # float32 angles at positions < 600


def test_positional_encoding_uses_an_edited_table():
    classic = ClassicPositionalEncoding(16, dropout=0.0, max_len=50)
    classic.pe.add_(0.01 * torch.randn_like(classic.pe))  # "trained"
    ours = PositionalEncoding(16, max_len=50)
    ours.load_state_dict(classic.state_dict())
    assert not ours.uses_formula()
    x = rand(20, 2, 16)
    assert torch.equal(ours(x), classic(x))
    fresh = PositionalEncoding(16, max_len=50)
    fresh.pe[3, 0, 0] += 1.0  # edited in place after construction
    assert not fresh.uses_formula()
    assert torch.equal(fresh(x), x + fresh.pe[:20])


def test_positional_encoding_sees_a_table_assigned_through_data():
    """``pe.data = edited`` keeps the tensor and its version counter: the module kept adding the formula.
    (An in-place edit through ``pe.data`` is not seen; the docstring says so and how to edit instead.)"""
    x = rand(20, 2, 16)
    module = PositionalEncoding(16, max_len=50)
    assert module.uses_formula()
    module.pe.data = module.pe.data * 2.0
    assert not module.uses_formula()
    assert torch.equal(module(x), x + module.pe[:20])
    module.pe.data = PositionalEncoding(16, max_len=50).pe  # the formula's table again: the kernel again
    assert module.uses_formula()
    with torch.no_grad():
        module.pe.mul_(2.0)
    assert not module.uses_formula()


def test_positional_encoding_batch_first_dropout_and_max_len():
    module = PositionalEncoding(8, max_len=10, batch_first=True)
    x = rand(2, 7, 8)
    torch.testing.assert_close(module(x), x + module.pe[:7].transpose(0, 1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="max_len=10"):
        module(rand(2, 11, 8))
    for width in (6, 16):  # another d_model: the classic module raises; the formula path had fit any width
        with pytest.raises(ValueError, match="d_model=8"):
            module(rand(2, 7, width))
    drop = PositionalEncoding(8, max_len=10, dropout=0.5).train()
    out = drop(rand(7, 2, 8))
    assert (out == 0).any()


@pytest.mark.parametrize("module_dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_positional_encoding_result_dtype_is_the_classic_modules(module_dtype, x_dtype):
    """``x + pe`` promotes: a bfloat16 ``x`` through a float32 module (autocast, mixed precision) gives
    float32 in the classic module and, before, bfloat16 here on the formula path (float32 on the
    stored-table path: the dtype depended on whether ``pe`` was edited)."""
    classic = ClassicPositionalEncoding(16, dropout=0.0, max_len=50).to(module_dtype)
    ours = PositionalEncoding(16, max_len=50).to(module_dtype)
    ours.load_state_dict(classic.state_dict())
    x = rand(20, 3, 16).to(x_dtype)
    want = classic(x)
    for _ in range(2):  # the formula (where the cast table still is it), then an edited table
        got = ours(x)
        assert got.dtype == want.dtype
        # the result dtype's rounding (torch's default tolerances), and no looser than the classic table's own
        # float32 angles at these 20 positions (up to 2e-7 from the formula, which the float64 results show)
        eps = torch.finfo(got.dtype).eps
        torch.testing.assert_close(got, want, rtol=eps, atol=max(eps, 1e-6))
        with torch.no_grad():
            ours.pe.mul_(1.5)
            classic.pe.mul_(1.5)
        assert not ours.uses_formula()
        want = classic(x)


def test_rotary_embedding_module_grows_and_stays_float32():
    module = RotaryEmbedding(16, max_seq_len=8)
    q, k = rand(2, 4, 6, 32), rand(2, 2, 6, 32)
    q_out, _ = module(q, k, seqlen_offset=10)  # needs 16 positions: the cache grows
    assert module.cos_cached.shape[0] >= 16
    cos, sin = fused_attention.rotary_cos_sin(16, 16)
    expected = fused_attention.apply_rotary_emb(q, cos, sin, seqlen_offsets=10)
    torch.testing.assert_close(q_out, expected)
    module.half()
    assert module.cos_cached.dtype == torch.float32
    q16, _ = module(q.half(), k.half())
    assert q16.dtype == torch.float16


def test_rotary_embedding_threads():
    module = RotaryEmbedding(8, max_seq_len=4)
    q, k = rand(1, 2, 5, 8), rand(1, 2, 5, 8)
    results, errors = [], []

    def work(offset):
        try:
            results.append((offset, module(q, k, seqlen_offset=offset)[0]))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(o,)) for o in range(0, 400, 25)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    cos, sin = fused_attention.rotary_cos_sin(405, 8)
    for offset, out in results:
        torch.testing.assert_close(out, fused_attention.apply_rotary_emb(q, cos, sin, seqlen_offsets=offset))


def test_rotary_embedding_tables_are_read_as_a_pair():
    """A thread that reads the tables while another grows them gets both old or both new: read between
    the rebuild's two assignments (unlocked), they were a new cos with an old sin (a shape error; with
    dynamic NTK, tables of two lengths). The rebuild here pauses between the two, as a preempted one would."""
    module = RotaryEmbedding(8, max_seq_len=4)
    between, read = threading.Event(), threading.Event()

    def pausing_rebuild(length, device):
        cos, sin = fused_attention.rotary_cos_sin(length, 8, device=device)
        module.cos_cached = cos
        between.set()
        read.wait(0.5)  # a reader that does not wait for the lock reads now
        module.sin_cached = sin

    module._rebuild = pausing_rebuild
    errors = []

    def grow():
        module(rand(1, 2, 9, 8), rand(1, 2, 9, 8))

    def read_short():
        between.wait(5)
        try:
            q, k = rand(1, 2, 3, 8), rand(1, 2, 3, 8)
            out, _ = module(q, k)
            cos, sin = fused_attention.rotary_cos_sin(3, 8)
            torch.testing.assert_close(out, fused_attention.apply_rotary_emb(q, cos, sin))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)
        read.set()

    threads = [threading.Thread(target=grow), threading.Thread(target=read_short)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_rotary_embedding_position_ids_and_compile():
    module = RotaryEmbedding(8, max_seq_len=64)
    q, k = rand(2, 2, 5, 8), rand(2, 2, 5, 8)
    ids = torch.tensor([[0, 1, 2, 3, 4], [9, 8, 7, 6, 5]])
    eager = module(q, k, position_ids=ids)
    compiled = torch.compile(lambda a, b: module(a, b, position_ids=ids), fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(q, k), eager):
        torch.testing.assert_close(a, b)


def test_alibi_module():
    module = ALiBi(12)
    assert torch.equal(module(), fused_attention.alibi_slopes(12))
    module.half()
    assert module().dtype == torch.float32
    assert "slopes" not in module.state_dict()


@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_tables_built_on_the_meta_device_are_rebuilt_by_to_empty(positional):
    """A model built on the meta device, then ``to_empty`` and ``load_state_dict`` (the large-model and
    FSDP recipe): the tables are non-persistent buffers that no state_dict restores, so leaving the meta
    device must rebuild them (before, they held uninitialised memory: NaN or silently wrong outputs)."""
    from fused_attention.nn import MultiheadAttention

    reference = MultiheadAttention(16, 4, batch_first=True, positional=positional).eval()
    with torch.device("meta"):
        built = MultiheadAttention(16, 4, batch_first=True, positional=positional)
    for module in (built, MultiheadAttention(16, 4, batch_first=True, positional=positional, device="meta")):
        module.to_empty(device="cpu").eval()
        module.load_state_dict(reference.state_dict())
        x = rand(2, 6, 16)
        torch.testing.assert_close(module(x, x, x)[0], reference(x, x, x)[0], rtol=0, atol=0)
    with torch.device("meta"):
        rotary, alibi = RotaryEmbedding(8, max_seq_len=16), ALiBi(12)
    rotary.to_empty(device="cpu")
    alibi.to_empty(device="cpu")
    assert torch.equal(rotary.cos_cached, RotaryEmbedding(8, max_seq_len=16).cos_cached)
    assert torch.equal(rotary.sin_cached, RotaryEmbedding(8, max_seq_len=16).sin_cached)
    assert torch.equal(alibi(), fused_attention.alibi_slopes(12))


@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_tables_built_on_the_meta_device_after_an_assigning_load(positional):
    """Built on the meta device, then ``load_state_dict(assign=True)`` (transformers' and accelerate's
    low-memory loading): the parameters become the loaded tensors, the non-persistent tables stay on the
    meta device (no state_dict holds them), and the first call raised (cos and sin on meta). They are built
    where the call's inputs are."""
    from fused_attention.nn import MultiheadAttention, SelfAttention

    torch.manual_seed(3)
    pairs = [(lambda: MultiheadAttention(16, 4, batch_first=True, positional=positional),
              lambda m, x: m(x, x, x, need_weights=False)[0]),
             (lambda: SelfAttention(16, 4, rotary=positional == "rope", alibi=positional == "alibi"),
              lambda m, x: m(x))]
    for make, call in pairs:
        reference = make().eval()
        with torch.device("meta"):
            module = make()
        module.load_state_dict(reference.state_dict(), assign=True)
        module.eval()
        x = rand(2, 6, 16)
        torch.testing.assert_close(call(module, x), call(reference, x), rtol=0, atol=0)
    # the varlen path of MultiheadAttention (nested inputs) too
    reference = MultiheadAttention(16, 4, batch_first=True, positional=positional).eval()
    with torch.device("meta"):
        module = MultiheadAttention(16, 4, batch_first=True, positional=positional)
    module.load_state_dict(reference.state_dict(), assign=True)
    module.eval()
    nested = torch.nested.nested_tensor([rand(3, 16), rand(5, 16)], layout=torch.jagged)
    with torch.no_grad():
        got, want = module(nested, nested, nested, need_weights=False)[0], reference(nested, nested, nested, need_weights=False)[0]
    for a, b in zip(got.unbind(), want.unbind()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- RoPE scalings against transformers ---------------------------------------------------------------

SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "beta_fast": 16.0,
     "mscale": 1.0, "mscale_all_dim": 0.5},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"])
@pytest.mark.parametrize("seq_len", [128, 1024])
def test_rope_scaling_matches_transformers(scaling, seq_len):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, context = 64, 256
    params = {"rope_theta": 10000.0, **scaling}
    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=context, rope_parameters=params
    )
    inv_freq, attention = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu", seq_len=seq_len)
    ours = dict(scaling)
    if ours["rope_type"] == "dynamic":
        ours["original_max_position_embeddings"] = context  # transformers reads max_position_embeddings
    cos, sin = fused_attention.rotary_cos_sin(seq_len, head_dim, scaling=ours, dtype=torch.float64)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
    # transformers computes its frequencies in float32: compare within that rounding
    torch.testing.assert_close(cos, angles.cos() * attention, rtol=0, atol=2e-6 * seq_len)
    torch.testing.assert_close(sin, angles.sin() * attention, rtol=0, atol=2e-6 * seq_len)


@pytest.mark.parametrize("kind", ["default", "llama3", "yarn"])
def test_rope_parameters_of_transformers_5_configs_as_they_are(kind):
    """``config.rope_parameters`` (transformers 5: ``rope_theta`` inside, ``rope_type: "default"``, ``None``
    for a method's default, the old ``type`` key kept) goes in unedited, for the tables and the module; each
    of those was an error (unknown key rope_theta, rope_type 'default', beta_fast None)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, seq_len = 32, 96
    scaling = {
        "default": None,
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64},
        "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": None},
    }[kind]
    config = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=512,
                                      rope_theta=50000.0, rope_scaling=scaling)
    params = config.rope_parameters
    assert params["rope_theta"] == 50000.0 and params["rope_type"] == kind
    init = ROPE_INIT_FUNCTIONS.get(kind)
    if init is None:  # plain RoPE: transformers has no init function for it in every version
        inv_freq, attention = 1.0 / 50000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim), 1.0
    else:
        inv_freq, attention = init(config, "cpu")
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
    cos, sin = fused_attention.rotary_cos_sin(seq_len, head_dim, scaling=params, dtype=torch.float64)
    torch.testing.assert_close(cos, angles.cos() * attention, rtol=0, atol=2e-6 * seq_len)
    torch.testing.assert_close(sin, angles.sin() * attention, rtol=0, atol=2e-6 * seq_len)
    module = RotaryEmbedding(head_dim, scaling=params, max_seq_len=seq_len)
    torch.testing.assert_close(module.cos_cached.double(), cos, rtol=0, atol=1e-6)


def test_rope_parameters_that_disagree_or_cannot_apply_raise():
    with pytest.raises(ValueError, match="differs from scaling's rope_theta"):
        fused_attention.rotary_cos_sin(8, 8, base=10000.0, scaling={"rope_type": "default", "rope_theta": 5e5})
    with pytest.raises(ValueError, match="partial_rotary_factor"):  # rotary_dim says which features rotate
        fused_attention.rotary_cos_sin(8, 8, scaling={"rope_type": "default", "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="needs factor"):  # was a factor of 1: no scaling, silently
        fused_attention.rotary_cos_sin(8, 8, scaling={"rope_type": "linear"})
    with pytest.raises(ValueError, match="'default' takes no factor"):
        fused_attention.rotary_cos_sin(8, 8, scaling={"rope_type": "default", "factor": 2.0})
    plain = fused_attention.rotary_cos_sin(8, 8, base=5e5)
    same = fused_attention.rotary_cos_sin(8, 8, base=5e5, scaling={"rope_type": "default", "rope_theta": 5e5})
    assert all(torch.equal(x, y) for x, y in zip(plain, same))


def test_rope_scaling_dataclass_and_bad_input():
    a = fused_attention.rotary_cos_sin(10, 8, scaling=fused_attention.RopeScaling("linear", factor=2.0))
    b = fused_attention.rotary_cos_sin(10, 8, scaling={"type": "linear", "factor": 2.0})
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="rope_type"):
        fused_attention.rotary_cos_sin(10, 8, scaling={"rope_type": "bogus"})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        fused_attention.rotary_cos_sin(10, 8, scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="rotary_dim"):
        fused_attention.rotary_cos_sin(10, 7)


def test_rotary_embedding_dynamic_ntk_follows_the_sequence_length():
    """Dynamic NTK: frequencies from max(sequence, original context), whatever the cache's history."""
    scaling = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}
    module = RotaryEmbedding(8, scaling=scaling, max_seq_len=64)
    for seq in (8, 40, 8, 24, 16):
        q, k = rand(1, 2, seq, 8), rand(1, 2, seq, 8)
        cos, sin = fused_attention.rotary_cos_sin(max(seq, 16), 8, scaling=scaling)
        for got, x in zip(module(q, k), (q, k)):
            torch.testing.assert_close(got, fused_attention.apply_rotary_emb(x, cos, sin), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="rotary_dim > 2"):
        fused_attention.rotary_cos_sin(4, 2, scaling=scaling)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"d_model": 15}, "d_model"), ({"d_model": [1, 2]}, "d_model"), ({"d_model": 16.0}, "d_model"),
     ({"d_model": 0}, "d_model"), ({"d_model": 16, "max_len": -1}, "max_len"),
     ({"d_model": 16, "max_len": 2.5}, "max_len")],
)
def test_positional_encoding_construction_errors_name_the_argument(kwargs, name):
    """(A list, a float or a negative length failed inside torch with messages naming no argument.)"""
    with pytest.raises(AttentionArgumentError, match=name):
        PositionalEncoding(**kwargs)
