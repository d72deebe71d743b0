"""Fine-tune a BERT classifier with fused attention (the classic recipe: BERT encoder, dropout, linear
classifier on the pooled output) on a small sentiment set built here. No downloads.

    python examples/bert_text_classification.py --tiny          # seconds
    python examples/bert_text_classification.py --model PATH    # a local pretrained checkpoint
"""

from __future__ import annotations

import argparse
import random

import torch
from torch import nn

import fused_attention.integrations.huggingface  # noqa: F401  (registers attn_implementation="fused_attention")

POSITIVE = ["good", "great", "lovely", "excellent", "fun", "wonderful", "superb", "enjoyable"]
NEGATIVE = ["bad", "awful", "boring", "terrible", "dull", "poor", "horrible", "tedious"]
FILLER = ["the", "movie", "was", "really", "quite", "plot", "acting", "and", "a", "film", "very", "story"]


def make_dataset(n: int, rng: random.Random) -> list[tuple[str, int]]:
    """Sentences of filler words with one or two sentiment words; label 1 = positive. Lengths vary, so
    batches are padded."""
    data = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.choices(FILLER, k=rng.randint(3, 12))
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        data.append((" ".join(words), label))
    return data


class WordTokenizer:
    """Whitespace word tokenizer with [PAD]=0, [CLS]=1, [UNK]=2."""

    def __init__(self, vocab: list[str]):
        self.ids = {w: i + 3 for i, w in enumerate(sorted(set(vocab)))}
        self.vocab_size = len(self.ids) + 3

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        rows = [[1] + [self.ids.get(w, 2) for w in t.split()] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class BertClassifier(nn.Module):
    def __init__(self, bert: nn.Module, num_labels: int, dropout: float):
        super().__init__()
        self.bert, self.dropout = bert, nn.Dropout(dropout)
        self.classifier = nn.Linear(bert.config.hidden_size, num_labels)

    def forward(self, **inputs) -> torch.Tensor:
        return self.classifier(self.dropout(self.bert(**inputs).pooler_output))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local pretrained BERT checkpoint (directory with config and weights)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few steps (CI)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoTokenizer, BertConfig, BertModel

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    train, test = make_dataset(512, rng), make_dataset(128, rng)
    steps, batch_size = (16, 32) if args.tiny else (args.steps, 32)
    if args.tiny and args.steps != parser.get_default("steps"):
        steps = args.steps
    if args.model:
        bert = BertModel.from_pretrained(args.model, attn_implementation="fused_attention")
        hf_tokenizer = AutoTokenizer.from_pretrained(args.model)

        def tokenizer(texts):
            return dict(hf_tokenizer(texts, padding=True, return_tensors="pt"))
    else:
        tokenizer = WordTokenizer(POSITIVE + NEGATIVE + FILLER)
        width, layers = (32, 1) if args.tiny else (128, 4)
        config = BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=2 * width, max_position_embeddings=64,
        )
        bert = BertModel(config)
        bert.set_attn_implementation("fused_attention")
    print(f"attention implementation: {bert.config._attn_implementation}")
    model = BertClassifier(bert, num_labels=2, dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5 if args.model else 1e-2)

    def evaluate(when: str) -> None:
        model.eval()
        labels = torch.tensor([y for _, y in test])
        with torch.no_grad():
            logits = model(**tokenizer([t for t, _ in test]))
        model.train()
        accuracy = (logits.argmax(-1) == labels).float().mean().item()
        print(f"{when}: test loss {nn.functional.cross_entropy(logits, labels).item():.4f} accuracy {accuracy:.3f}")

    evaluate("before")
    for step in range(1, steps + 1):
        batch = rng.sample(train, batch_size)
        loss = nn.functional.cross_entropy(model(**tokenizer([t for t, _ in batch])), torch.tensor([y for _, y in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % max(1, steps // 10) == 0 or step == steps:
            print(f"step {step:4d} loss {loss.item():.4f}")
    evaluate("after")


if __name__ == "__main__":
    main()
