"""What the compiler made of the C++ CPU kernels, read from the built extension's machine code.

Some choices live only in the generated code: a test of results cannot see them go. The register tiles
of the products (``gemm_tile`` in ``csrc/cpu/attention_gemm.h``) must fit each variant's register file:
with 64-byte vectors in every variant, the AVX2 one spilled its accumulators on every step and ran the
forward 8.7x slower than the AVX-512 one on the same core. The decode products
ask for the rows of scattered caches ahead of use (``prefetch_tokens`` in ``csrc/cpu/attention_decode.h``);
GCC drops calls to a function that only reads memory and prefetches unless it is inlined, and then the
FlashAttention-layout and paged decode read 1.2-1.7x slower with identical results.
"""

from __future__ import annotations

import functools
import platform
import re
import shutil
import subprocess

import pytest

from fused_attention._extension import load_extension

objdump = shutil.which("objdump")
pytestmark = [
    pytest.mark.skipif(not load_extension().loaded, reason="the C++ extension is not built"),
    pytest.mark.skipif(objdump is None, reason="objdump (binutils) is not installed"),
]

# A function's first line in `objdump -d -C`, and a prefetch instruction (x86 prefetch*, Arm prfm).
_FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
_PREFETCH = re.compile(r"^\s*[0-9a-f]+:\s+(prefetch\w*|prfm)\s")
# (instruction set, product, template arguments) of the decode products that prefetch.
_DECODE_PRODUCT = re.compile(r"cpu::(\w+)::(decode_chunk|decode_scores|decode_values)<([\w:, ]+)>\(")
# The bfloat16 decode's P V tiles: widened V rows (values_tile) or key pairs on vdpbf16ps (values_tile_pairs).
_BF16_VALUES_TILE = re.compile(r"cpu::(\w+)::(values_tile|values_tile_pairs)<(\d+, \d+),")
# dot_keys of float and bfloat16 keys (and its row-block lambdas): it asks for the keys ahead as it goes.
_DOT_KEYS = re.compile(r"cpu::(\w+)::(dot_keys)<[\w:]*?(FloatDot<float>|Bf16Dot), float>")
# The float decode's P V tile over a cache's rows: it asks for the value rows ahead (RowsAhead).
_VALUES_AHEAD = re.compile(r"cpu::(\w+)::(gemm_tile)<(float, \d+, \d+), true>\(")


@functools.cache
def _functions() -> dict[str, list[str]]:
    """Each function of the extension (demangled name) and its instructions, from `objdump -d -C`."""
    from fused_attention import _C

    listing = subprocess.run(
        [objdump, "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    functions: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in listing.splitlines():
        header = _FUNCTION.match(line)
        if header:
            lines = functions.setdefault(header.group(1), [])
        else:
            lines.append(line)
    return functions


def _prefetches_by_function() -> dict[str, int]:
    return {name: sum(bool(_PREFETCH.match(line)) for line in lines) for name, lines in _functions().items()}


def test_decode_products_prefetch_scattered_rows():
    # Each instantiation (instruction set, function, types) may be split in parts (a cold part, a clone):
    # one of them must hold the prefetches.
    groups: dict[tuple[str, ...], int] = {}
    for name, count in _prefetches_by_function().items():
        match = (_BF16_VALUES_TILE.search(name) or _DECODE_PRODUCT.search(name) or _DOT_KEYS.search(name)
                 or _VALUES_AHEAD.search(name))
        if match:
            groups[match.groups()] = groups.get(match.groups(), 0) + count
    isas = {isa for isa, function, types in groups if function == "decode_chunk" and types == "float, float"}
    assert isas, f"no float decode_chunk in the extension's symbols (renamed? stripped?): {sorted(groups)}"
    # The products are functions of their own in every instruction set (not inlined out of sight).
    for isa in sorted(isas):
        for function in ("decode_scores", "decode_values"):
            assert (isa, function, "float, float") in groups, f"{isa}: no {function}<float, float> symbol"
        assert (isa, "dot_keys", "FloatDot<float>") in groups, f"{isa}: no dot_keys<FloatDot<float>, float> symbol"
        ahead = [key for key in groups if key[:2] == (isa, "gemm_tile")]
        assert ahead, f"{isa}: no gemm_tile<float, rows, vectors, true> symbol (the P V tile that asks ahead)"
    missing = sorted(" ".join(key) for key, count in groups.items() if count == 0)
    assert not missing, f"no prefetch instruction in: {missing}"


# A vector register stored to or loaded from the stack (x86-64 SysV keeps no vector register across
# calls, so in a leaf routine that is a spill).
_STACK_VECTOR = re.compile(r"^\s*[0-9a-f]+:\s+\S+\s+(%[xyz]mm\d+,.*\(%rsp\)|.*\(%rsp\),%[xyz]mm\d+)")
# (A fourth argument, whether the tile asks for rows ahead, shows in the names: `false` by default.)
_GEMM_TILE = re.compile(r"cpu::(\w+)::gemm_tile<(\w+), (\d+), (\d+)(?:, (?:true|false))?>\(")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86-64 machine code")
def test_register_tiles_do_not_spill():
    spills: dict[tuple[str, ...], int] = {}
    for name, lines in _functions().items():
        tile = _GEMM_TILE.search(name)
        if tile:
            spills[tile.groups()] = spills.get(tile.groups(), 0) + sum(bool(_STACK_VECTOR.match(line)) for line in lines)
    isas = {isa for isa, *_ in spills}
    assert {"baseline", "avx2", "avx512"} <= isas, f"gemm_tile variants missing from the symbols: {sorted(isas)}"
    # The blocked forward's and backward's 6-row tiles, not only the decode's.
    for isa in ("baseline", "avx2", "avx512"):
        assert any(key[0] == isa and key[2] == "6" for key in spills), f"{isa}: no 6-row gemm_tile symbol"
    spilling = {tile: count for tile, count in spills.items() if count}
    assert not spilling, f"(variant, type, rows, vectors) -> stack moves of vector registers: {spilling}"


_DPBF16 = re.compile(r"^\s*[0-9a-f]+:\s+vdpbf16ps\s")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86-64 machine code")
def test_bf16_value_tiles_pair_keys_without_spills():
    """The bfloat16 decode's P V tiles keep their accumulators in registers, and on AVX512-BF16 multiply
    two keys per vdpbf16ps (values_tile_pairs: 1.2x an 8-row step's speed over widening V to float)."""
    tiles: dict[tuple[str, ...], list[str]] = {}
    for name, lines in _functions().items():
        tile = _BF16_VALUES_TILE.search(name)
        if tile:
            tiles.setdefault(tile.groups(), []).extend(lines)
    assert ("avx512", "values_tile", "4, 2") in tiles, f"no avx512 values_tile<4, 2> symbol: {sorted(tiles)}"
    assert ("avx512bf16", "values_tile_pairs", "4, 2") in tiles, f"no avx512bf16 values_tile_pairs<4, 2>: {sorted(tiles)}"
    for (isa, function, shape), lines in tiles.items():
        assert not any(_STACK_VECTOR.match(line) for line in lines), f"{isa} {function}<{shape}> spills"
        if function == "values_tile_pairs":
            assert any(_DPBF16.match(line) for line in lines), f"{isa} {function}<{shape}>: no vdpbf16ps"
    # The amx variant runs on Intel cores only, whose vdpbf16ps gives half the products per cycle of widening
    # to float FMAs: the decode rows its tiles do not take widen, as the avx512 variant's do.
    amx = {(function, shape) for isa, function, shape in tiles if isa == "amx"}  # (none: built without AMX)
    assert not amx or (("values_tile", "4, 2") in amx and not any(f == "values_tile_pairs" for f, _ in amx)), amx
    assert not any("amx::Bf16Dot" in name for name in _functions()), "amx variant: q.k on vdpbf16ps"


# The per-call tiles that take a prefetch plan, and the plan's parameter type in their demangled name (a
# clone's suffix, " [clone .constprop.0]", stripped first).
_AHEAD_TAKER = re.compile(r"cpu::(\w+)::(gemm_tile|dot_keys)<.*\bRowsAhead( const&)?\)$")
_CLONE = re.compile(r"(\s*\[clone [^\]]*\])+$")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads the x86-64 variants' symbols")
def test_prefetch_plans_reach_the_tiles_by_reference():
    """gemm_tile and dot_keys take their RowsAhead (40 bytes) by reference. Passed by value, each call
    built the copy on the stack from narrower stores and read it back whole, a load that waits for those
    stores instead of taking their data (store forwarding fails): `perf` put 5-7% of a float32 backward's
    samples on the store right after it, and the decode steps' q.k calls (16 keys each) paid it too."""
    takers: dict[tuple[str, str], set[bool]] = {}
    for name in _functions():
        match = _AHEAD_TAKER.search(_CLONE.sub("", name))
        if match:
            takers.setdefault(match.group(1, 2), set()).add(match.group(3) is not None)
    assert ("avx512", "gemm_tile") in takers and ("avx512", "dot_keys") in takers, sorted(takers)
    by_value = sorted(key for key, references in takers.items() if False in references)
    assert not by_value, f"(variant, function) taking RowsAhead by value: {by_value}"
