"""Tile configurations of the Triton attention kernels, per pass and GPU architecture.

A small candidate list per (pass, architecture) that the autotuner times once per shape bucket; large
head dims keep only the tiles whose operands fit in shared memory and registers. Under the Triton
interpreter one fixed small tile per pass is used instead: it has no hardware to tune for, and small
tiles keep CPU tests fast while still crossing several tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    ("forward", 90): (Tile(128, 128, 8, 3), Tile(128, 64, 8, 3), Tile(128, 32, 8, 2), Tile(64, 64, 4, 2)),
    # dK/dV: a program holds a key block and its dK/dV accumulators, and walks query blocks; the key
    # block is every matmul's M (wgmma on sm_90: >= 64). 64 x 128 spills on sm_90 (bf16, head dim 128).
    ("backward_dkdv", 80): (Tile(32, 128, 8, 2), Tile(32, 64, 4, 2), Tile(16, 64, 4, 2)),
    ("backward_dkdv", 90): (Tile(32, 128, 8, 3), Tile(32, 128, 8, 2), Tile(16, 64, 4, 2)),
    # dQ: a program holds a query block and its dQ accumulator, and walks key blocks
    ("backward_dq", 80): (Tile(128, 32, 8, 2), Tile(64, 32, 4, 2), Tile(64, 16, 4, 2)),
    ("backward_dq", 90): (Tile(128, 64, 8, 2), Tile(128, 32, 8, 3), Tile(64, 16, 4, 2)),
}

# One shape for every pass, so that the interpreter's matmuls (NumPy's) recompute the forward's
# scores bit for bit in backward, as the GPU's tensor cores do for any tile shape (fixed k order).
INTERPRETER_TILES = {
    "forward": Tile(16, 32, 4, 1),
    "backward_dkdv": Tile(16, 32, 4, 1),
    "backward_dq": Tile(16, 32, 4, 1),
}



def arch_of(capability: tuple[int, int]) -> int:
    major, minor = capability
    return 90 if major * 10 + minor >= 90 else 80


# Shared memory the compiler may use, bytes: A100 164 KiB per block less headroom; H100/H200 227 KiB, all
# of it for the forward (its 128x128 tile at head dim 128 takes 224 KiB, which the estimate counts
# exactly), less headroom for the backward passes (their estimate leaves out some buffers).
_SHARED_BUDGET = {80: 150 * 1024, 90: 210 * 1024}
_FORWARD_SHARED_BUDGET = {80: 150 * 1024, 90: 227 * 1024}

# Tiles whose kernel spills registers when one of these features is on (dropout's Philox streams, a
# mask's pointers, ALiBi's or softcap's extra live values), per (pass, architecture); pruned then.
# From benchmarks/results/2026-12-03-triton-static*.md; the compile test fails on a 16-bit forward that spills.
_HEAVY = frozenset({"dropout", "mask"})
_SPILL_WITH: dict[tuple[str, int, Tile], frozenset[str]] = {
    ("forward", 80, Tile(128, 64, 8, 3)): _HEAVY,
    ("forward", 90, Tile(128, 128, 8, 3)): _HEAVY,
    ("forward", 90, Tile(128, 64, 8, 3)): _HEAVY,
    ("forward", 90, Tile(128, 32, 8, 2)): _HEAVY,
    # sm_80 dK/dV at head dim 128: 312 spill stores with dropout, 13 with ALiBi, 7 with softcap; 2-8 with
    # a mask or dropout at 64. dQ: 2 with ALiBi.
    ("backward_dkdv", 80, Tile(32, 128, 8, 2)): _HEAVY | {"alibi", "softcap"},
    ("backward_dkdv", 80, Tile(32, 64, 4, 2)): _HEAVY | {"alibi", "softcap"},
    ("backward_dq", 80, Tile(64, 32, 4, 2)): frozenset({"alibi"}),
}


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
    ("backward_dkdv", 80): ((Tile(16, 64, 8, 2), 16, 128), (Tile(16, 32, 8, 1), 256, 256)),
    ("backward_dkdv", 90): ((Tile(16, 64, 8, 2), 16, 64), (Tile(16, 16, 4, 2), 128, 128), (Tile(16, 32, 8, 2), 256, 256)),
    ("backward_dq", 80): ((Tile(64, 16, 8, 2), 16, 64), (Tile(32, 16, 4, 2), 16, 128), (Tile(16, 16, 4, 2), 256, 256)),
    ("backward_dq", 90): ((Tile(32, 16, 4, 2), 16, 128), (Tile(16, 16, 4, 2), 256, 256)),
}

# Small enough for float32 at head dim 256 on sm_80 (the compile test checks it).
_FALLBACK = {"forward": Tile(64, 16, 4, 1), "backward_dkdv": Tile(16, 32, 4, 1), "backward_dq": Tile(32, 16, 4, 1)}


def candidates(
    pass_name: str, arch: int, block_d: int, elem_bytes: int, features: frozenset[str] = frozenset(),
    ieee: bool = False,
) -> list[Tile]:
    """The tiles the autotuner may pick for ``pass_name`` on ``arch`` at padded head dim ``block_d``
    (the larger of the q/k and v head dims) for inputs of ``elem_bytes`` bytes per element; ``features``:
    those of :data:`_SPILL_WITH` in use; ``ieee``: float32 with IEEE products. The first is deterministic
    mode's."""
    if ieee:
        tiles = [t for t, narrowest, widest in _IEEE_CANDIDATES[pass_name, arch]
                 if narrowest <= block_d <= widest and _fits(t, pass_name, arch, block_d, elem_bytes)]
    else:
        tiles = [t for t in _CANDIDATES[pass_name, arch] if _fits(t, pass_name, arch, block_d, elem_bytes)
                 and not features & _SPILL_WITH.get((pass_name, arch, t), frozenset())]
    return tiles or [_FALLBACK[pass_name]]


def launch_candidates(pass_name: str, arch: int, args: dict) -> list[Tile]:
    """:func:`candidates` for a launch's arguments: its padded head dims, input width, the features
    :data:`_SPILL_WITH` prunes for, and whether its products are float32 IEEE."""
    flags = {"dropout": "DROPOUT", "mask": "MASK", "alibi": "ALIBI", "softcap": "SOFTCAP"}
    features = frozenset(name for name, key in flags.items() if args.get(key))
    return candidates(pass_name, arch, max(args["BLOCK_D"], args["BLOCK_DV"]), args["Q"].element_size(), features,
                      ieee=args.get("DOT_PRECISION") == "ieee")


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
