"""Ahead-of-time compile of the Triton attention kernels as the GPU runs them, and what their SASS shows.

No GPU is needed: Triton's compiler targets ``GPUTarget("cuda", arch, 32)`` and its wheel ships
``cuobjdump``/``nvdisasm``. Two things make the compile faithful to a real launch:

- the launches come from the real launchers (:func:`launches`), run on meta tensors with the launch
  intercepted: the same arguments, compile-time flags and autotune candidates as a real call;
- the specialization comes from Triton's own JIT binder (:func:`specialize`): the code a launch runs to
  turn arguments into a signature, so pointers are 16-byte aligned (meta tensors report address 0, as
  the CUDA caching allocator's 256-byte-aligned blocks do), ints divisible by 16 are marked so and
  ints equal to 1 become constants, exactly as at run time.

Used by ``tests/test_triton_compile.py`` (compiles and fails on spills / ``mma.sync`` on sm_90) and
``benchmarks/triton_static.py`` (the table). A new kernel needs no registration here as long as its
launcher goes through ``attention_launch.run``; a kernel launched another way is added to
:data:`EXTRA_LAUNCHERS`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Largest dynamic shared memory per block (bytes): A100 (sm_80) and H100/H200 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}


class UnsupportedTriton(RuntimeError):
    """The installed Triton lacks the JIT binder internals this helper reproduces (Triton < 3.4)."""


@dataclasses.dataclass(frozen=True)
class Call:
    """One attention call: dtype, matmul precision, head dims, features (see :data:`FEATURES`)."""

    dtype: str = "bfloat16"
    tf32: bool = False
    head_dim: int = 128
    value_head_dim: int = 128
    features: frozenset[str] = frozenset()
    deterministic: bool = False
    batch: int = 2
    heads: int = 4
    kv_heads: int = 2
    seq_q: int = 300
    seq_k: int = 500


# bool_mask/float_mask: a full (B, 1 | H, L, S) mask; mask_rows/mask_cols make the float mask broadcast
# along that dim; mask_grad: the float mask's gradient is wanted; gqa: kv_heads < heads is the default,
# so "gqa" only documents it (Call.kv_heads decides).
FEATURES = (
    "causal", "window", "alibi", "softcap", "key_lengths", "dropout", "bool_mask", "float_mask",
    "mask_grad", "mask_rows", "mask_cols", "varlen", "sinks", "gqa",
)

# Launches that do not go through attention_launch.run: (module, function) -> called like it, returning
# nothing; the backward helper adds preprocess kernels here if it launches them directly.
EXTRA_LAUNCHERS: list[Callable[..., None]] = []


def launches(call: Call, arch: int) -> list[tuple[Any, str, dict[str, Any]]]:
    """``(kernel, pass name, args)`` of every launch the real launchers make for ``call`` on ``arch``."""
    import torch

    from fused_attention.kernels.triton import attention_backward, attention_launch
    from fused_attention.kernels.triton.attention_forward import attention_forward

    dtype = getattr(torch, call.dtype)
    meta = {"device": "meta", "dtype": dtype}
    f = call.features
    b, hq, hkv, seq_q, seq_k = call.batch, call.heads, call.kv_heads, call.seq_q, call.seq_k
    if "varlen" in f:
        q = torch.empty(seq_q, hq, call.head_dim, **meta)
        k = torch.empty(seq_k, hkv, call.head_dim, **meta)
        v = torch.empty(seq_k, hkv, call.value_head_dim, **meta)
        cu = torch.empty(b + 1, dtype=torch.int32, device="meta")
        out, lse = torch.empty(seq_q, hq, call.value_head_dim, **meta), torch.empty(hq, seq_q, device="meta")
    else:
        q = torch.empty(b, hq, seq_q, call.head_dim, **meta)
        k = torch.empty(b, hkv, seq_k, call.head_dim, **meta)
        v = torch.empty(b, hkv, seq_k, call.value_head_dim, **meta)
        cu = None
        out, lse = torch.empty(b, hq, seq_q, call.value_head_dim, **meta), torch.empty(b, hq, seq_q, device="meta")
    mask = None
    if "bool_mask" in f:
        mask = torch.empty(b, 1, seq_q, seq_k, dtype=torch.bool, device="meta")
    elif "float_mask" in f:
        shape = (1, hq, 1 if "mask_rows" in f else seq_q, 1 if "mask_cols" in f else seq_k)
        mask = torch.empty(shape, **meta)
    problem = attention_launch.Problem(
        q=q, k=k, v=v, mask=mask,
        key_lengths=torch.empty(b, dtype=torch.int64, device="meta") if "key_lengths" in f else None,
        alibi=torch.empty(1, hq, device="meta") if "alibi" in f else None,
        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=seq_q, max_seqlen_k=seq_k,
        causal="causal" in f, window_left=256 if "window" in f else -1, window_right=0 if "window" in f else -1,
        softcap=30.0 if "softcap" in f else 0.0, scale=call.head_dim**-0.5, dropout_p=0.1 if "dropout" in f else 0.0,
        seed=(1 << 40) + 12345 if "dropout" in f else 0,
        sinks=torch.empty(hq, device="meta") if "sinks" in f else None,
    )
    found = []

    def capture(kernel, tuned, pass_name, problem, args):
        found.append((kernel, pass_name, args))

    saved = (attention_launch.run, attention_launch.torch.cuda.get_device_capability,
             torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled())
    torch.backends.cuda.matmul.allow_tf32 = call.tf32
    torch.use_deterministic_algorithms(call.deterministic)
    attention_launch.run = capture
    attention_launch.torch.cuda.get_device_capability = lambda *a: divmod(arch, 10)
    try:
        attention_forward(problem, out, lse)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        attention_backward.attention_backward(problem, out, lse, dq, dk, dv, "mask_grad" in f, "alibi" in f,
                                              "sinks" in f, out=out)
        for launcher in EXTRA_LAUNCHERS:
            launcher(problem, out, lse, capture)
    finally:
        attention_launch.run, attention_launch.torch.cuda.get_device_capability = saved[:2]
        torch.backends.cuda.matmul.allow_tf32 = saved[2]
        torch.use_deterministic_algorithms(saved[3])
    return found


def tiles_for(pass_name: str, args: dict[str, Any], arch: int, deterministic: bool = False) -> list:
    """The tiles dispatch may launch for these args on ``arch``: the autotune candidates, or the one
    fixed tile of deterministic mode."""
    from fused_attention.kernels.triton import attention_configs

    tiles = attention_configs.launch_candidates(pass_name, arch, args)
    return tiles[:1] if deterministic else tiles


def specialize(kernel, args: dict[str, Any], arch: int, options: dict[str, Any]):
    """``(ASTSource, target, options)`` of the launch ``kernel[grid](**args, **options)`` on ``arch``,
    built by Triton's own JIT binder and argument packing (see the module docstring)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    try:
        from triton.runtime.jit import create_function_from_signature
    except ImportError as error:
        raise UnsupportedTriton(f"triton.runtime.jit has no create_function_from_signature ({error})") from None
    if not hasattr(kernel, "_pack_args"):
        raise UnsupportedTriton("JITFunction has no _pack_args")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**args, **options, "debug": False}
    bound, specialization, opts = binder(**kwargs)
    parsed, signature, constexprs, attrs = kernel._pack_args(backend, opts, bound, specialization, opts)
    return ASTSource(kernel, signature, constexprs, attrs), target, parsed.__dict__


def compile_launch(kernel, args: dict[str, Any], arch: int, tile) -> Any:
    """The compiled kernel of one launch with ``tile`` (a ``attention_configs.Tile``)."""
    import triton

    full = args | {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n}
    source, target, options = specialize(kernel, full, arch,
                                         {"num_warps": tile.num_warps, "num_stages": tile.num_stages})
    return triton.compile(source, target=target, options=options)


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def sass(cubin: bytes) -> str:
    """The SASS of a cubin (``cuobjdump -sass``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        return subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout


def registers(cubin: bytes) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                              check=True).stdout
    return int(re.search(r"REG:(\d+)", text).group(1))


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def instructions(text: str) -> list[tuple[int, str, str]]:
    """``(address, opcode with modifiers, operands)`` of every SASS instruction, NOPs dropped."""
    out = []
    for match in _INSTRUCTION.finditer(text):
        address, _, opcode, operands = match.groups()
        if opcode != "NOP":
            out.append((int(address, 16), opcode, operands.strip()))
    return out


@dataclasses.dataclass(frozen=True)
class Loop:
    start: int  # address of the first instruction
    end: int  # address of the backward branch
    instructions: int
    spill_stores: int
    spill_loads: int
    wgmma: int  # HGMMA (Hopper warpgroup MMA)
    mma_sync: int  # HMMA (Ampere-style mma.sync)


def _count(body: list[tuple[int, str, str]], prefix: str) -> int:
    return sum(1 for _, opcode, _ in body if opcode.startswith(prefix))


def loops(code: list[tuple[int, str, str]]) -> list[Loop]:
    """Innermost loops: a backward branch ``BRA`` to an earlier address closes ``[target, branch]``;
    a loop that contains another loop's body is dropped (its count would mix the two)."""
    spans = []
    for address, opcode, operands in code:
        if opcode.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) < address:
                spans.append((int(target.group(1), 16), address))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    out = []
    for start, end in sorted(set(inner)):
        body = [ins for ins in code if start <= ins[0] <= end]
        out.append(Loop(start, end, len(body), _count(body, "STL"), _count(body, "LDL"),
                        _count(body, "HGMMA"), _count(body, "HMMA")))
    return out


@dataclasses.dataclass(frozen=True)
class Stats:
    registers: int
    shared: int
    spill_stores: int  # STL instructions in the whole kernel (static count)
    spill_loads: int
    instructions: int
    wgmma: int
    mma_sync: int
    loops: tuple[Loop, ...]


def stats(compiled) -> Stats:
    """Registers, shared memory, static spill stores/loads and the SASS loops of a compiled kernel."""
    cubin = compiled.asm["cubin"]
    code = instructions(sass(cubin))
    return Stats(registers(cubin), compiled.metadata.shared, _count(code, "STL"), _count(code, "LDL"), len(code),
                 _count(code, "HGMMA"), _count(code, "HMMA"), tuple(loops(code)))
