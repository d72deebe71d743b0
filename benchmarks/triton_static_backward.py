"""Static measure of the Triton attention backward kernels, without a GPU: compile each pass ahead of time
for sm_80 / sm_90 with the specialization Triton's JIT applies at run time, and read what the GPU runs.

For every backward launch dispatch makes (captured from the real launcher on meta tensors) and every tile
candidate of its pass, it reports: matmuls in the pass's main loop (``tt.dot`` / ``warp_group_dot`` in the
TTGIR), which MMA they lower to (``wgmma``: HGMMA in SASS; ``mma.sync``: HMMA), registers and spill
stores/loads (``ptxas -v`` on the kernel's PTX), and shared memory.

    python benchmarks/triton_static_backward.py [--dtype bfloat16] [--head-dim 128] [--features causal,...]

Runtime specialization: the JIT's own binder (``create_function_from_signature`` with the target's
backend) marks 16-byte-aligned pointers and ints divisible by 16, and turns ints equal to 1 into
constants, exactly as a launch on a GPU would for tensors of these shapes (meta tensors: data_ptr 0).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _launches(dtype, head_dim, features, arch, batch, heads, kv_heads, seq):
    import torch

    from fused_attention.kernels.triton import attention_backward, attention_launch

    q = torch.empty(batch, heads, seq, head_dim, dtype=dtype, device="meta")
    k = torch.empty(batch, kv_heads, seq, head_dim, dtype=dtype, device="meta")
    lse = torch.empty(batch, heads, seq, dtype=torch.float32, device="meta")
    problem = attention_launch.Problem(
        q=q, k=k, v=k, mask=None, key_lengths=None, alibi=None, cu_seqlens_q=None, cu_seqlens_k=None,
        max_seqlen_q=seq, max_seqlen_k=seq, causal="causal" in features, window_left=-1, window_right=-1,
        softcap=0.0, scale=head_dim ** -0.5, dropout_p=0.0, seed=0,
    )
    launches = []
    original_run, original_cap = attention_launch.run, attention_launch.torch.cuda.get_device_capability
    attention_launch.run = lambda kernel, tuned, pass_name, problem, args: launches.append((kernel, pass_name, args))
    attention_launch.torch.cuda.get_device_capability = lambda *a: divmod(arch, 10)
    try:
        attention_backward.attention_backward(problem, q, lse, torch.empty_like(q), torch.empty_like(k),
                                              torch.empty_like(k), False, False, out=q)
    finally:
        attention_launch.run, attention_launch.torch.cuda.get_device_capability = original_run, original_cap
    return launches


def _compile(kernel, args, tile, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature, find_paths_if, get_iterable_path

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    full = args | {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n}
    bound, specialization, _ = binder(**{p.name: full[p.name] for p in kernel.params})
    names = [p.name for p in kernel.params]
    sigvals = [x[0] for x in specialization]
    signature = dict(zip(names, sigvals))
    constexpr_paths = find_paths_if(sigvals, lambda _, v: v == "constexpr")
    constexprs = {path: get_iterable_path(list(bound.values()), path) for path in constexpr_paths}
    attrvals = ["" if x[0] == "constexpr" else x[1] for x in specialization]
    attr_paths = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {path: backend.parse_attr(get_iterable_path(attrvals, path)) for path in attr_paths}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})


def _ptxas(ptx: str, arch: int) -> dict:
    import triton

    binary = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([str(binary), "-v", f"--gpu-name={gpu}", str(path), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    regs = re.search(r"Used (\d+) registers", out)
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def _sass_mma(cubin: bytes) -> dict:
    import triton

    binary = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(binary), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    return {"HGMMA (wgmma)": len(re.findall(r"\bHGMMA\.", sass)), "HMMA (mma.sync)": len(re.findall(r"\bHMMA\.", sass))}


def main() -> int:
    import torch

    from fused_attention.kernels.triton import attention_configs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--features", default="", help="comma-separated: causal")
    parser.add_argument("--arch", default="90,80")
    parser.add_argument("--all-tiles", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4096)
    opts = parser.parse_args()
    dtype = getattr(torch, opts.dtype)
    features = set(filter(None, opts.features.split(",")))
    print("| arch | pass | tile (M, N, warps, stages) | matmuls (TTGIR dots) | wgmma dots | HGMMA | HMMA "
          "| registers | spill stores | spill loads | shared bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for arch in map(int, opts.arch.split(",")):
        for kernel, pass_name, args in _launches(dtype, opts.head_dim, features, arch, opts.batch, opts.heads,
                                                 opts.kv_heads, opts.seq):
            tiles = attention_configs.launch_candidates(pass_name, arch, args)
            for tile in tiles if opts.all_tiles else tiles[:1]:
                compiled = _compile(kernel, args, tile, arch)
                ttgir = compiled.asm["ttgir"]
                dots = len(re.findall(r"= tt\.dot ", ttgir)) + len(re.findall(r"ttng\.warp_group_dot ", ttgir))
                wgmma = len(re.findall(r"ttng\.warp_group_dot ", ttgir))
                res = _ptxas(compiled.asm["ptx"], arch)
                sass = _sass_mma(compiled.asm["cubin"])
                print(f"| sm_{arch} | {pass_name} | {tile.block_m}, {tile.block_n}, {tile.num_warps}, {tile.num_stages} "
                      f"| {dots} | {wgmma} | {sass['HGMMA (wgmma)']} | {sass['HMMA (mma.sync)']} | {res['registers']} "
                      f"| {res['spill_stores']} | {res['spill_loads']} | {compiled.metadata.shared} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
