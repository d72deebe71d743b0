"""Tile configurations of the Triton attention kernels, per pass and GPU architecture.

A small candidate list per (pass, architecture) that the autotuner times once per shape bucket; large
head dims keep only the tiles whose operands fit in shared memory and registers. Under the Triton
interpreter one fixed tile per call is used instead (interpreter_tile): it has no hardware to tune for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PASSES = ("forward", "backward_dkdv", "backward_dq")
ARCHS = (80, 90)  # Ampere (A100) and Hopper (H100/H200); other GPUs use the nearest older list


@dataclass(frozen=True)
class Tile:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


_CANDIDATES: dict[tuple[str, int], tuple[Tile, ...]] = {
    # forward: 8 warps for 128 query rows (4 spill on sm_80: 214 spill stores); benchmarks/triton_static.py
    ("forward", 80): (Tile(128, 64, 8, 3), Tile(64, 64, 4, 3), Tile(64, 32, 4, 2)),
    # 128x32 w8: TF32 at head dim 128 (64x64 w4 spills 267 stores there), bfloat16 at 256 (41 -> 7)
    # 64x32 w4: a user mask (every larger tile spills with one)
    ("forward", 90): (Tile(128, 128, 8, 3), Tile(128, 64, 8, 3), Tile(128, 32, 8, 2), Tile(64, 64, 4, 2),
                      Tile(64, 32, 4, 2)),
    # dK/dV: a program holds a key block and its dK/dV accumulators, and walks query blocks; the key
    # block is every matmul's M (wgmma on sm_90: >= 64). 64 x 128 spills on sm_90 (bf16, head dim 128).
    ("backward_dkdv", 80): (Tile(32, 128, 8, 2), Tile(32, 64, 4, 2), Tile(16, 64, 4, 2)),
    ("backward_dkdv", 90): (Tile(32, 128, 8, 3), Tile(32, 128, 8, 2), Tile(16, 64, 4, 2)),
    # dQ: a program holds a query block and its dQ accumulator, and walks key blocks
    ("backward_dq", 80): (Tile(128, 32, 8, 2), Tile(64, 32, 4, 2), Tile(64, 16, 4, 2)),
    ("backward_dq", 90): (Tile(128, 64, 8, 2), Tile(128, 32, 8, 3), Tile(64, 16, 4, 2)),
}

# Under the interpreter one tile shape serves every pass of a call, so that its matmuls (NumPy's)
# recompute the forward's scores bit for bit in backward, as the GPU's tensor cores do for any tile shape
# (fixed k order). Small problems take a small tile, so that tests still cross several tiles both ways;
# past INTERPRETER_SMALL_TILES of those, a 64 x 64 tile (a GPU's size): the interpreter costs about the
# same per Triton op at any tile size, and a (64, 1025) call ran 5x faster so.
INTERPRETER_SMALL_TILE = Tile(16, 32, 4, 1)
INTERPRETER_LARGE_TILE = Tile(64, 64, 4, 1)
INTERPRETER_SMALL_TILES = 32


def interpreter_tile(seq_q: int, seq_k: int) -> Tile:
    """The interpreter's tile for a call of (max) ``seq_q`` query rows and ``seq_k`` keys, every pass."""
    small = INTERPRETER_SMALL_TILE
    tiles = -(-seq_q // small.block_m) * -(-seq_k // small.block_n)
    return small if tiles <= INTERPRETER_SMALL_TILES else INTERPRETER_LARGE_TILE


def arch_of(capability: tuple[int, int]) -> int:
    major, minor = capability
    return 90 if major * 10 + minor >= 90 else 80


# Shared memory the compiler may use, bytes: A100 164 KiB per block less headroom; H100/H200 227 KiB, all
# of it for the forward (its 128x128 tile at head dim 128 takes 224 KiB, which the estimate counts
# exactly), less headroom for the backward passes (their estimate leaves out some buffers).
_SHARED_BUDGET = {80: 150 * 1024, 90: 210 * 1024}
_FORWARD_SHARED_BUDGET = {80: 150 * 1024, 90: 227 * 1024}

# Tiles whose kernel spills registers with some features on, per (pass, architecture): each rule is a
# set of features that together make it spill (dropout's Philox streams, a mask's pointers, ALiBi's or
# softcap's extra live values, the query-head group walked inside a dK/dV program, packed rows, a float
# mask's gradient; "d128"/"d64": a padded head dim of 128 or more / 64 or less; "fp16": float16 operands). The first
# candidate that no rule prunes is what deterministic mode launches; at run time the autotuner also drops
# whatever the compiler reports spilling (attention_launch.without_spills).
# From benchmarks/results/2026-12-03-triton-static*.md and 2026-12-03-triton-spill-rules.md.
_HEAVY = (frozenset({"dropout"}), frozenset({"mask"}))


def _rules(*sets: set[str]) -> tuple[frozenset[str], ...]:
    return tuple(frozenset(s) for s in sets)


_SPILL_WITH: dict[tuple[str, int, Tile], tuple[frozenset[str], ...]] = {
    ("forward", 80, Tile(128, 64, 8, 3)): _HEAVY,
    ("forward", 80, Tile(64, 64, 4, 3)): _rules({"dropout", "d128"}),
    # float16 at head dim 128: 4-24 spill stores (bfloat16 none)
    ("forward", 90, Tile(128, 128, 8, 3)): _HEAVY + _rules({"fp16", "d128"}),
    ("forward", 90, Tile(128, 64, 8, 3)): _HEAVY,
    ("forward", 90, Tile(128, 32, 8, 2)): _HEAVY,
    ("forward", 90, Tile(64, 64, 4, 2)): _rules({"mask"}),
    # a user mask with dropout (with every feature: 28-42 spill stores; the fallback tile runs then)
    ("forward", 80, Tile(64, 32, 4, 2)): _rules({"mask", "dropout"}),
    ("forward", 90, Tile(64, 32, 4, 2)): _rules({"mask", "dropout"}),
    # sm_80 dK/dV at head dim 128: 312 spill stores with dropout, 13 with ALiBi, 7 with softcap, 7-16
    # with a query-head group or packed rows, 1 with a window; 2-8 with a mask or dropout at 64.
    ("backward_dkdv", 80, Tile(32, 128, 8, 2)): _HEAVY + _rules({"alibi"}, {"softcap"}, {"gqa", "d128"},
                                                                 {"varlen", "d128"}, {"window", "d128"}),
    ("backward_dkdv", 80, Tile(32, 64, 4, 2)): _HEAVY + _rules({"alibi"}, {"softcap"}, {"gqa", "d128"},
                                                                {"varlen", "d128"}),
    ("backward_dkdv", 80, Tile(16, 64, 4, 2)): _rules({"gqa", "d64"}, {"mask_grad", "d128"}, {"dropout", "d128"}),
    # sm_90 dK/dV: 10 spill stores with a query-head group at 128 (three stages), 16-113 with a mask, 14-39
    # with dropout and a query-head group
    ("backward_dkdv", 90, Tile(32, 128, 8, 3)): _HEAVY + _rules({"gqa", "d128"}),
    ("backward_dkdv", 90, Tile(32, 128, 8, 2)): _HEAVY,
    ("backward_dkdv", 90, Tile(16, 64, 4, 2)): _rules({"mask_grad"}, {"dropout", "gqa"}),
    ("backward_dq", 90, Tile(128, 64, 8, 2)): _HEAVY,
    ("backward_dq", 90, Tile(128, 32, 8, 3)): _HEAVY,
    # dQ: 1-6 with ALiBi, delta from the scores (a mask or slope gradient), dropout at 128, or a mask
    ("backward_dq", 80, Tile(128, 32, 8, 2)): _rules({"delta_from_scores", "d128"}, {"dropout", "d128"}, {"mask"}),
    ("backward_dq", 80, Tile(64, 32, 4, 2)): _rules({"alibi"}, {"delta_from_scores", "d128"}, {"mask"}),
}


def _pruned(pass_name: str, arch: int, tile: Tile, features: frozenset[str]) -> bool:
    return any(rule <= features for rule in _SPILL_WITH.get((pass_name, arch, tile), ()))


def _shared_estimate(tile: Tile, pass_name: str, block_d: int, elem_bytes: int) -> int:
    """Shared memory of a tile: the block held for the whole program plus the pipelined stream of
    the other operand (q/k/v tiles of width ``block_d``; K and V, or Q and dO, travel together)."""
    held, streamed = (tile.block_n, tile.block_m) if pass_name == "backward_dkdv" else (tile.block_m, tile.block_n)
    held_width = block_d if pass_name == "forward" else 2 * block_d
    return elem_bytes * (held * held_width + tile.num_stages * streamed * 2 * block_d)


def _fits(tile: Tile, pass_name: str, arch: int, block_d: int, elem_bytes: int) -> bool:
    """Whether a tile fits in shared memory, and keeps its float32 accumulators within registers
    (at most 64 x 256 per 4 warps)."""
    held = tile.block_n if pass_name == "backward_dkdv" else tile.block_m
    registers_ok = held * block_d <= 64 * 256 * tile.num_warps // 4
    budget = (_FORWARD_SHARED_BUDGET if pass_name == "forward" else _SHARED_BUDGET)[arch]
    return registers_ok and _shared_estimate(tile, pass_name, block_d, elem_bytes) <= budget


# float32 with IEEE products (torch's default): no tensor cores, so the products are FMA loops whose
# operands live in registers, and only small tiles keep from spilling. Each tile with the padded head
# dims at which it compiles spill-free (benchmarks/results/2026-12-03-triton-static-fp32.md).
_IEEE_CANDIDATES: dict[tuple[str, int], tuple[tuple[Tile, int, int], ...]] = {
    ("forward", 80): ((Tile(64, 32, 8, 2), 16, 64), (Tile(32, 16, 4, 2), 16, 128), (Tile(32, 16, 8, 2), 256, 256)),
    ("forward", 90): ((Tile(64, 32, 8, 2), 16, 64), (Tile(32, 16, 4, 2), 16, 128), (Tile(32, 16, 8, 2), 256, 256)),
    # dK/dV: its score tiles are (queries, keys) as the dQ pass's, whose products it repeats bit for bit, so
    # the held keys and values are both the right operand of a product (checked with every feature but
    # a mask at 32-64, and at 128-256 too, where 16 x 64 spills on sm_80 and 16 x 32 on sm_90)
    ("backward_dkdv", 80): ((Tile(16, 32, 8, 1), 16, 64), (Tile(16, 16, 8, 1), 128, 128), (Tile(16, 16, 4, 1), 256, 256)),
    ("backward_dkdv", 90): ((Tile(16, 64, 8, 2), 16, 64), (Tile(16, 16, 8, 2), 128, 128), (Tile(16, 16, 8, 1), 256, 256)),
    ("backward_dq", 80): ((Tile(64, 16, 8, 2), 16, 64), (Tile(32, 16, 4, 2), 16, 128), (Tile(16, 16, 4, 2), 256, 256)),
    ("backward_dq", 90): ((Tile(32, 16, 4, 2), 16, 128), (Tile(16, 16, 4, 2), 256, 256)),
}

# Small enough for float32 at head dim 256 on sm_80 (the compile test checks it), and spill-free in 16 bits
# at head dim 128 with every feature on, on sm_80 and sm_90 (2026-12-03-triton-spill-rules.md): what a
# launch falls back to when every candidate is pruned or spills.
_FALLBACK = {"forward": Tile(64, 16, 4, 1), "backward_dkdv": Tile(16, 32, 4, 1), "backward_dq": Tile(32, 16, 4, 1)}


def last_resort(pass_name: str) -> Tile:
    return _FALLBACK[pass_name]


def candidates(
    pass_name: str, arch: int, block_d: int, elem_bytes: int, features: frozenset[str] = frozenset(),
    ieee: bool = False,
) -> list[Tile]:
    """The tiles the autotuner may pick for ``pass_name`` on ``arch`` at padded head dim ``block_d``
    (the larger of the q/k and v head dims) for inputs of ``elem_bytes`` bytes per element; ``features``:
    those of :func:`launch_features` in use; ``ieee``: float32 with IEEE products. The first is deterministic
    mode's."""
    if ieee:
        tiles = [t for t, narrowest, widest in _IEEE_CANDIDATES[pass_name, arch]
                 if narrowest <= block_d <= widest and _fits(t, pass_name, arch, block_d, elem_bytes)]
    else:
        tiles = [t for t in _CANDIDATES[pass_name, arch] if _fits(t, pass_name, arch, block_d, elem_bytes)
                 and not _pruned(pass_name, arch, t, features)]
    return tiles or [_FALLBACK[pass_name]]


_FLAGS = {"dropout": "DROPOUT", "mask": "MASK", "alibi": "ALIBI", "softcap": "SOFTCAP", "varlen": "VARLEN",
          "mask_grad": "MASK_GRAD", "delta_from_scores": "DELTA_FROM_SCORES"}


def launch_features(args: dict) -> frozenset[str]:
    """The features of a launch's arguments that :data:`_SPILL_WITH`'s rules name."""
    features = {name for name, key in _FLAGS.items() if args.get(key)}
    if args.get("WINDOW_LEFT") or args.get("WINDOW_RIGHT"):
        features.add("window")
    if args.get("groups", 1) > 1:
        features.add("gqa")
    block_d = max(args["BLOCK_D"], args["BLOCK_DV"])
    features.add("d128" if block_d >= 128 else "d64")  # d64: 64 or less
    if args["Q"].dtype == torch.float16:
        features.add("fp16")
    return frozenset(features)


def launch_candidates(pass_name: str, arch: int, args: dict) -> list[Tile]:
    """:func:`candidates` for a launch's arguments: its padded head dims, input width, the features
    :data:`_SPILL_WITH` prunes for, and whether its products are float32 IEEE."""
    return candidates(pass_name, arch, max(args["BLOCK_D"], args["BLOCK_DV"]), args["Q"].element_size(),
                      launch_features(args), ieee=args.get("DOT_PRECISION") == "ieee")


def all_candidates(pass_name: str) -> list[Tile]:
    """Every tile of every architecture for a pass: the autotuner's list, pruned at launch."""
    seen: dict[Tile, None] = {}
    for arch in ARCHS:
        for tile in _CANDIDATES[pass_name, arch]:
            seen[tile] = None
        for tile, _, _ in _IEEE_CANDIDATES[pass_name, arch]:
            seen[tile] = None
    seen[_FALLBACK[pass_name]] = None
    return list(seen)
