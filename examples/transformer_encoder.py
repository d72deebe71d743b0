"""A small Transformer encoder on fused attention, trained to reverse sequences, and the one-line
``patch_model`` on a stock ``torch.nn.TransformerEncoder``.

    python examples/transformer_encoder.py --tiny   # seconds
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fused_attention
from fused_attention.nn import PositionalEncoding, TransformerEncoderLayer


class Encoder(nn.Module):
    """Embedding + sinusoidal PositionalEncoding + encoder layers (Add & Norm, feed-forward) + head."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = PositionalEncoding(d_model, max_len=256, batch_first=True)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True) for _ in range(layers)
        )
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.position(self.embed(tokens) * self.embed.embedding_dim**0.5)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few steps (CI)")
    args = parser.parse_args()
    torch.manual_seed(0)
    vocab, seq, steps = 12, 10, (15 if args.tiny else args.steps)
    model = Encoder(vocab, d_model=32 if args.tiny else 64, heads=4, layers=1 if args.tiny else 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    print("part 1: training an encoder to reverse sequences")
    for step in range(1, steps + 1):
        tokens = torch.randint(0, vocab, (32, seq))
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flip(1).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % max(1, steps // 10) == 0 or step == steps:
            print(f"step {step:4d} loss {loss.item():.4f}")

    print("part 2: patch_model on torch.nn.TransformerEncoder")
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    torch_model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(4, seq, 32)
    with torch.no_grad():
        before = torch_model(x)
        replaced = fused_attention.patch_model(torch_model)
        after = torch_model(x)
    print(f"replaced {replaced} attention modules; max |difference| {(after - before).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
