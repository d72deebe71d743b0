"""The attention kernels' working buffers start on a cache line (``csrc/cpu/aligned_buffer.h``).

Where a buffer starts only decides speed, never results, so no test of results sees it go: malloc
aligns to 16 bytes, and a tile or vector row of 64 bytes then spans two cache lines. On AMX a product
over operands 16 bytes off a line ran 2.5x slower, and the bfloat16 forward 1.16-1.32x slower at short
sequences (2026-12-05). This test reads the kernel sources: a float or bfloat16 buffer that takes
std::vector's or new[]'s alignment fails it.
"""

from __future__ import annotations

import pathlib
import re

import pytest

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "cpu"
KERNEL_SOURCES = sorted(CSRC.glob("attention_*.h")) + sorted(CSRC.glob("attention_*.cpp"))
_ELEMENT = r"(?:acc_t|float|double|T|scalar_t|c10::BFloat16|c10::Half|u?int16_t)"
_UNALIGNED = re.compile(
    rf"std::vector<{_ELEMENT}>|new {_ELEMENT}\[|std::unique_ptr<{_ELEMENT}\[\]>|std::make_unique<{_ELEMENT}\[\]>"
)


def test_the_kernel_sources_are_found():
    assert len(KERNEL_SOURCES) > 10, KERNEL_SOURCES


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=lambda p: p.name)
def test_kernel_buffers_are_cache_line_aligned(path: pathlib.Path):
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _UNALIGNED.search(line.split("//")[0])
    ]
    assert not offenders, "use AlignedVector / aligned_array (aligned_buffer.h):\n" + "\n".join(offenders)
