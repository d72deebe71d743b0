"""Whole models on the CPU, with fused_attention and with torch's own attention, interleaved in one process.

Each model is built once (random weights, nothing downloaded) and run both ways, alternating which goes
first in each round; every row is the median over rounds of the wall time, and the speedup is
torch / ours (above 1: we are faster). The machine, versions, load and command are printed with the
table (and written with ``--out``), because the CPU may be shared.

- ``llama-decode``: a Hugging Face Llama-style decoder (``LlamaConfig(hidden_size=512,
  intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)``),
  greedy ``generate`` of 64 tokens after a 512-token prompt, batch 1: ``"fused_attention"`` against
  ``"sdpa"``. Decode steps call attention with one query against the whole cache.
- ``llama-prefill``: the same model, one forward over 2048 tokens.
- ``gemma2-decode``: a Gemma-2-style decoder (same sizes, logit softcap 50, sliding window 256 on
  alternate layers), prompt 512 + 64 tokens, against ``"eager"`` (transformers' Gemma-2 has no SDPA
  path: SDPA cannot softcap).
- ``bert-base``: ``BertModel`` with BERT-base sizes, a right-padded batch of 8 sequences of 32 to 128
  tokens; ``minilm``: an all-MiniLM-L6-v2-sized BERT (6 layers, hidden 384, 12 heads), a padded batch of
  32 sentences of up to 146 tokens (the sizes of the issue's measurement); inference, against ``"sdpa"``.
- ``encoder-infer`` / ``encoder-train``: ``torch.nn.TransformerEncoder`` with BERT-base layer sizes
  (d_model 768, 12 heads, feed-forward 3072, 2 layers), batch 8 x 128 tokens: inference (eval, no_grad;
  torch takes its own fused fast path there) and a training step (forward, backward), torch's model
  against a copy converted by ``fused_attention.patch_model``.
- ``classic-infer`` / ``classic-train``: the classic stack (sinusoidal ``PositionalEncoding`` + a
  ``TransformerEncoderLayer``, d_model 512, 8 heads, (seq, batch, d) layout, 8 x 256 tokens) built from
  ``fused_attention.nn`` against the same model from torch modules (the tutorial's positional encoding).

    python benchmarks/models.py [--rounds 5] [--models llama-decode,bert-base] [--threads N] [--dtype bfloat16]
                                [--out DIR] [--quick]

``--quick`` runs every model at toy sizes with two rounds (seconds; for the smoke test).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import fused_attention
import fused_attention.nn as fnn
from fused_attention.bench.report import cpu_model


@dataclass
class Row:
    model: str
    workload: str
    baseline: str
    torch_ms: float
    ours_ms: float

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.ours_ms


@dataclass(frozen=True)
class Sizes:
    """Model sizes; ``--quick`` shrinks them all."""

    hidden: int = 512
    layers: int = 4
    prompt: int = 512
    new_tokens: int = 64
    prefill: int = 2048
    window: int = 256
    bert_hidden: int = 768
    bert_layers: int = 12
    bert_batch: int = 8
    bert_max_len: int = 128
    minilm_batch: int = 32
    minilm_max_len: int = 146
    encoder_layers: int = 2
    encoder_batch: int = 8
    encoder_seq: int = 128
    classic_seq: int = 256


QUICK = Sizes(hidden=64, layers=2, prompt=16, new_tokens=4, prefill=64, window=8, bert_hidden=96, bert_layers=2,
              bert_batch=2, bert_max_len=16, minilm_batch=2, minilm_max_len=16, encoder_layers=1, encoder_batch=2,
              encoder_seq=16, classic_seq=16)


def interleaved(torch_fn: Callable[[], object], ours_fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median wall times (ms) of the two, after one warm-up call each, alternating which runs first."""
    torch_fn()
    ours_fn()
    times: dict[str, list[float]] = {"torch": [], "ours": []}
    for r in range(rounds):
        order = (("torch", torch_fn), ("ours", ours_fn)) if r % 2 == 0 else (("ours", ours_fn), ("torch", torch_fn))
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times["torch"]), statistics.median(times["ours"])


# ------------------------------------------------------------------------------------------ Hugging Face


def _hf_decoder(kind: str, s: Sizes, dtype: torch.dtype):
    import transformers

    import fused_attention.integrations.huggingface  # noqa: F401  (registers "fused_attention")

    common = {
        "hidden_size": s.hidden, "intermediate_size": 2 * s.hidden, "num_hidden_layers": s.layers,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 4096,
    }
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Gemma2Config(**common, head_dim=s.hidden // 8, attn_logit_softcapping=50.0,
                                           final_logit_softcapping=30.0, sliding_window=s.window)
        model = transformers.Gemma2ForCausalLM(config)
    return model.to(dtype).eval()


def _generate(model, implementation: str, prompt: torch.Tensor, new_tokens: int) -> Callable[[], object]:
    def run():
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert out.shape[1] == prompt.shape[1] + new_tokens
        return out

    return run


def _forward(model, implementation: str, **inputs: torch.Tensor) -> Callable[[], object]:
    def run():
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            return model(**inputs)

    return run


def hf_decoders(s: Sizes, rounds: int, wanted: set[str], dtype: torch.dtype) -> list[Row]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    if wanted & {"llama-decode", "llama-prefill"}:
        torch.manual_seed(0)
        model = _hf_decoder("llama", s, dtype)
        if "llama-decode" in wanted:
            prompt = torch.randint(1, 32000, (1, s.prompt), generator=gen)
            t, o = interleaved(_generate(model, "sdpa", prompt, s.new_tokens),
                               _generate(model, "fused_attention", prompt, s.new_tokens), rounds)
            rows.append(Row("Llama-style (HF), 4 layers, GQA 8/2", f"generate {s.prompt} + {s.new_tokens} tokens",
                            "sdpa", t, o))
        if "llama-prefill" in wanted:
            ids = torch.randint(1, 32000, (1, s.prefill), generator=gen)
            t, o = interleaved(_forward(model, "sdpa", input_ids=ids, use_cache=False),
                               _forward(model, "fused_attention", input_ids=ids, use_cache=False), rounds)
            rows.append(Row("Llama-style (HF), 4 layers, GQA 8/2", f"prefill forward, {s.prefill} tokens", "sdpa", t, o))
    if "gemma2-decode" in wanted:
        torch.manual_seed(0)
        model = _hf_decoder("gemma2", s, dtype)
        prompt = torch.randint(1, 32000, (1, s.prompt), generator=gen)
        t, o = interleaved(_generate(model, "eager", prompt, s.new_tokens),
                           _generate(model, "fused_attention", prompt, s.new_tokens), rounds)
        rows.append(Row(f"Gemma-2-style (HF), softcap 50, window {s.window}",
                        f"generate {s.prompt} + {s.new_tokens} tokens", "eager", t, o))
    return rows


def _padded_batch(batch: int, max_len: int, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Right-padded token ids and attention mask, lengths spread from a quarter of ``max_len`` to it."""
    lengths = torch.randint(max(1, max_len // 4), max_len + 1, (batch,), generator=gen)
    lengths[0] = max_len
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (batch, max_len), generator=gen) * mask
    return {"input_ids": ids, "attention_mask": mask}


def hf_bert(s: Sizes, rounds: int, wanted: set[str], dtype: torch.dtype) -> list[Row]:
    import transformers

    import fused_attention.integrations.huggingface  # noqa: F401  (registers "fused_attention")

    rows = []
    gen = torch.Generator().manual_seed(0)
    bert_base = {"hidden_size": s.bert_hidden, "num_hidden_layers": s.bert_layers, "num_attention_heads": 12,
                 "intermediate_size": 4 * s.bert_hidden}
    minilm = {"hidden_size": max(s.bert_hidden // 2, 48), "num_hidden_layers": min(6, s.bert_layers),
              "num_attention_heads": 12, "intermediate_size": 2 * s.bert_hidden}
    configs = {
        "bert-base": (bert_base, s.bert_batch, s.bert_max_len, "BERT-base sizes (HF)"),
        "minilm": (minilm, s.minilm_batch, s.minilm_max_len, "all-MiniLM-L6-v2 sizes (HF BERT)"),
    }
    for name, (kwargs, batch, max_len, title) in configs.items():
        if name not in wanted:
            continue
        torch.manual_seed(0)
        model = transformers.BertModel(transformers.BertConfig(**kwargs)).to(dtype).eval()
        inputs = _padded_batch(batch, max_len, model.config.vocab_size, gen)
        t, o = interleaved(_forward(model, "sdpa", **inputs), _forward(model, "fused_attention", **inputs), rounds)
        rows.append(Row(title, f"inference, padded batch {batch} x {max_len}", "sdpa", t, o))
    return rows


# ------------------------------------------------------------------------------------------ torch.nn


def _timed_step(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    return step


def _inference(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return model(x)

    return run


def encoder(s: Sizes, rounds: int, wanted: set[str], dtype: torch.dtype) -> list[Row]:
    rows = []
    torch.manual_seed(0)
    d = s.bert_hidden
    layer = nn.TransformerEncoderLayer(d, 12, 4 * d, batch_first=True)
    ref = nn.TransformerEncoder(layer, s.encoder_layers, enable_nested_tensor=False).to(dtype)
    ours = copy.deepcopy(ref)
    assert fused_attention.patch_model(ours) == s.encoder_layers
    x = torch.randn(s.encoder_batch, s.encoder_seq, d, dtype=dtype)
    title = f"nn.TransformerEncoder, d 768, 12 heads, {s.encoder_layers} layers"
    if "encoder-infer" in wanted:
        ref.eval()
        ours.eval()
        t, o = interleaved(_inference(ref, x), _inference(ours, x), rounds)
        rows.append(Row(title, f"inference {s.encoder_batch} x {s.encoder_seq}", "torch fast path", t, o))
    if "encoder-train" in wanted:
        ref.train()
        ours.train()
        t, o = interleaved(_timed_step(ref, x), _timed_step(ours, x), rounds)
        rows.append(Row(title, f"training step {s.encoder_batch} x {s.encoder_seq}", "torch MHA", t, o))
    return rows


class ClassicPositionalEncoding(nn.Module):
    """The PyTorch tutorial's module: a precomputed table added to ``(seq, batch, d)`` inputs, then dropout."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 5000):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pe[: x.size(0)])


def classic(s: Sizes, rounds: int, wanted: set[str], dtype: torch.dtype) -> list[Row]:
    rows = []
    d, heads = s.hidden, 8
    torch.manual_seed(0)
    ref = nn.Sequential(ClassicPositionalEncoding(d), nn.TransformerEncoderLayer(d, heads, 4 * d))
    torch.manual_seed(0)
    ours = nn.Sequential(fnn.PositionalEncoding(d, dropout=0.1), fnn.TransformerEncoderLayer(d, heads, 4 * d))
    ours.load_state_dict(ref.state_dict())
    ref, ours = ref.to(dtype), ours.to(dtype)
    x = torch.randn(s.classic_seq, 8, d, dtype=dtype)
    title = f"classic stack: PositionalEncoding + TransformerEncoderLayer, d {d}, {heads} heads"
    if "classic-infer" in wanted:
        ref.eval()
        ours.eval()
        t, o = interleaved(_inference(ref, x), _inference(ours, x), rounds)
        rows.append(Row(title, f"inference {s.classic_seq} x 8", "torch modules (fast path)", t, o))
    if "classic-train" in wanted:
        ref.train()
        ours.train()
        t, o = interleaved(_timed_step(ref, x), _timed_step(ours, x), rounds)
        rows.append(Row(title, f"training step {s.classic_seq} x 8", "torch modules", t, o))
    return rows


# ------------------------------------------------------------------------------------------ report

MODELS = ("llama-decode", "llama-prefill", "gemma2-decode", "bert-base", "minilm", "encoder-infer",
          "encoder-train", "classic-infer", "classic-train")
HF_MODELS = {"llama-decode", "llama-prefill", "gemma2-decode", "bert-base", "minilm"}


def machine(argv: list[str]) -> dict[str, object]:
    cpu = cpu_model()
    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = None
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": hf, "fused_attention": fused_attention.__version__,
        "python": platform.python_version(), "load_before": os.getloadavg(),
        "command": " ".join(["python", "benchmarks/models.py", *argv]),
    }


def markdown(rows: list[Row]) -> str:
    lines = ["| model | workload | torch baseline | torch (ms) | fused_attention (ms) | speedup |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.model} | {r.workload} | {r.baseline} | {r.torch_ms:.1f} | {r.ours_ms:.1f} | {r.speedup:.2f}x |"
              for r in rows]
    return "\n".join(lines)


def run(models: list[str], sizes: Sizes, rounds: int, dtype: torch.dtype = torch.float32) -> list[Row]:
    wanted = set(models)
    try:
        import transformers  # noqa: F401
    except ImportError:
        if wanted & HF_MODELS:
            print(f"transformers is not installed: skipping {sorted(wanted & HF_MODELS)}", file=sys.stderr)
        wanted -= HF_MODELS
    rows = []
    for group in (hf_decoders, hf_bert, encoder, classic):
        rows += group(sizes, rounds, wanted, dtype)
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="toy sizes, two rounds (a smoke test)")
    parser.add_argument("--out", type=Path, help="write models.md and models.json here")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the models' parameters and inputs (bfloat16: what CPUs with AMX serve fastest)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    info = machine(sys.argv[1:] if argv is None else argv)
    rows = run(models, QUICK if args.quick else Sizes(), 2 if args.quick else args.rounds, getattr(torch, args.dtype))
    info["load_after"] = os.getloadavg()
    table = markdown(rows)
    header = (f"{info['date']}; {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads; "
              f"torch {info['torch']}, transformers {info['transformers']}, Python {info['python']}; "
              f"load average before {info['load_before'][0]:.2f}, after {info['load_after'][0]:.2f}\n"
              f"`{info['command']}`; {args.dtype}, wall time, medians of {2 if args.quick else args.rounds} "
              "interleaved rounds; speedup = torch / fused_attention\n")
    print(header)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "models.md").write_text(header + "\n" + table + "\n")
        (args.out / "models.json").write_text(json.dumps(
            {"machine": info, "rows": [dict(vars(r), speedup=r.speedup) for r in rows]}, indent=2))
    return rows


if __name__ == "__main__":
    main()
