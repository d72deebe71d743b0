"""Ahead-of-time compile of every Triton attention kernel specialization dispatch can launch, for sm_80
and sm_90, with Triton's compiler (``triton.compile(ASTSource(...), target=GPUTarget(...))``: no GPU).

The interpreter never runs Triton's compiler, so a kernel it runs could still be rejected on a GPU;
this test makes such a kernel fail CI, and also one whose shared memory exceeds what the architecture
can give a block (it would fail at launch). The specializations come from the real launchers, run on
meta tensors with the launch intercepted: the same arguments, compile-time flags and autotune
candidates as a real call. The set is bounded (see :func:`specs`): every autotune candidate of every
pass at the head dims and dtypes that need the most shared memory, all features on (the largest
kernels) for both architectures, and every dtype (float32 with IEEE and TF32 matmuls), padded head dim
(16 to 256) and feature variant (bool mask, mask-gradient reductions, varlen, a value head dim unlike
the query's, deterministic mode) at least once.

Run as a script (``python tests/test_triton_compile.py``) it compiles in parallel and prints failures;
the test runs it in a fresh process without ``TRITON_INTERPRET`` (kernels must be real JIT functions).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Largest dynamic shared memory per block (bytes): A100 (sm_80) and H100/H200 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}
_TYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int32": "i32", "int64": "i64", "uint8": "u8"}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One call: dtype, matmul precision, head dims, features, and whether every tile is compiled."""

    dtype: str
    tf32: bool
    head_dim: int
    value_head_dim: int
    features: frozenset[str]
    all_tiles: bool
    deterministic: bool = False


ALL_FEATURES = frozenset(
    {"causal", "window", "softcap", "alibi", "float_mask", "mask_grad", "key_lengths", "dropout", "sinks"}
)


def specs() -> list[tuple[Spec, tuple[int, ...]]]:
    """``(spec, architectures)``, bounded to a few minutes on 2 cores (a kernel with every feature takes
    ~5 s): every tile with the base code at the head dims and dtypes that stress shared memory (tiles
    decide it), the largest kernels (all features, bfloat16) on both architectures, and every other
    code path (each feature variant, each dtype) once, on sm_90. Triton's on-disk cache
    makes reruns with unchanged kernels fast."""
    both, hopper = (80, 90), (90,)
    out = [(Spec(dtype, False, d, d, frozenset(), all_tiles=True), both)
           for dtype, d in (("bfloat16", 128), ("float32", 256))]
    out.append((Spec("bfloat16", False, 128, 128, ALL_FEATURES, all_tiles=False), both))
    out += [
        (Spec("float32", True, 64, 64, frozenset(), all_tiles=False), hopper),
        (Spec("bfloat16", False, 32, 32, frozenset({"bool_mask", "causal"}), all_tiles=False), hopper),
        (Spec("bfloat16", False, 64, 128, frozenset({"varlen", "window", "softcap", "alibi", "dropout", "sinks"}),
              all_tiles=False), hopper),
        (Spec("float32", False, 128, 128, frozenset({"float_mask", "mask_grad", "mask_cols", "alibi"}),
              all_tiles=False, deterministic=True), hopper),
        (Spec("float16", False, 16, 16, frozenset({"float_mask", "mask_grad", "mask_rows", "key_lengths"}),
              all_tiles=False), hopper),
    ]
    return out


def _launches(spec: Spec, arch: int) -> list[tuple[str, str, dict]]:
    """``(kernel name, pass, args)`` of every launch the real launchers make for ``spec`` (meta tensors)."""
    import torch

    from fused_attention.kernels.triton import attention_backward, attention_launch
    from fused_attention.kernels.triton.attention_forward import attention_forward

    dtype = getattr(torch, spec.dtype)
    meta = {"device": "meta", "dtype": dtype}
    f = spec.features
    b, hq, hkv, seq_q, seq_k = 2, 4, 2, 300, 500
    if "varlen" in f:
        q = torch.empty(seq_q, hq, spec.head_dim, **meta)
        k = torch.empty(seq_k, hkv, spec.head_dim, **meta)
        v = torch.empty(seq_k, hkv, spec.value_head_dim, **meta)
        cu = torch.empty(b + 1, dtype=torch.int32, device="meta")
        out, lse = torch.empty(seq_q, hq, spec.value_head_dim, **meta), torch.empty(hq, seq_q, device="meta")
    else:
        q = torch.empty(b, hq, seq_q, spec.head_dim, **meta)
        k = torch.empty(b, hkv, seq_k, spec.head_dim, **meta)
        v = torch.empty(b, hkv, seq_k, spec.value_head_dim, **meta)
        cu = None
        out, lse = torch.empty(b, hq, seq_q, spec.value_head_dim, **meta), torch.empty(b, hq, seq_q, device="meta")
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
        causal="causal" in f, window_left=64 if "window" in f else -1, window_right=3 if "window" in f else -1,
        softcap=30.0 if "softcap" in f else 0.0, scale=0.1, dropout_p=0.1 if "dropout" in f else 0.0,
        seed=(1 << 40) + 12345 if "dropout" in f else 0,
        sinks=torch.empty(hq, device="meta") if "sinks" in f else None,
    )
    launches = []

    def capture(kernel, tuned, pass_name, problem, args):
        launches.append((kernel.__name__, pass_name, args))

    torch.backends.cuda.matmul.allow_tf32 = spec.tf32
    torch.use_deterministic_algorithms(spec.deterministic)
    attention_launch.run = capture
    attention_launch.torch.cuda.get_device_capability = lambda *a: divmod(arch, 10)
    attention_forward(problem, out, lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    attention_backward.attention_backward(problem, out, lse, dq, dk, dv, "mask_grad" in f, "alibi" in f, "sinks" in f,
                                          out=out)
    return launches


def _signature(kernel, args: dict) -> tuple[dict, dict]:
    import torch

    signature, constexprs = {}, {}
    for param in kernel.params:
        name = param.name
        value = args[name]
        if param.is_constexpr or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPE[str(value.dtype).removeprefix("torch.")]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    return signature, constexprs


def compile_spec(job: tuple[Spec, int]) -> list[str]:
    """Compiles every launch of one spec for one architecture; returns failure lines."""
    import triton
    from triton.backends.compiler import GPUTarget

    from fused_attention.kernels.triton import attention_backward, attention_configs, attention_forward

    spec, arch = job
    kernels = {
        "attention_forward_kernel": attention_forward.attention_forward_kernel,
        "attention_dq_kernel": attention_backward.attention_dq_kernel,
        "attention_dkdv_kernel": attention_backward.attention_dkdv_kernel,
    }
    failures = []
    for name, pass_name, args in _launches(spec, arch):
        kernel = kernels[name]
        block_d = max(args["BLOCK_D"], args["BLOCK_DV"])
        tiles = attention_configs.candidates(pass_name, arch, block_d, args["Q"].element_size())
        for tile in tiles if spec.all_tiles else tiles[:1]:
            full = args | {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n}
            options = {"num_warps": tile.num_warps, "num_stages": tile.num_stages}
            signature, constexprs = _signature(kernel, full)
            label = f"sm_{arch} {name} {spec} {tile}"
            try:
                source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
            except Exception as error:  # noqa: BLE001  (every rejection is reported, then fails the test)
                failures.append(f"{label}: {type(error).__name__}: {str(error)[-1500:]}")
                continue
            if compiled.metadata.shared > SHARED_LIMIT[arch]:
                failures.append(f"{label}: {compiled.metadata.shared} bytes of shared memory > {SHARED_LIMIT[arch]}")
    return failures


def main() -> int:
    jobs = [(spec, arch) for spec, archs in specs() for arch in archs]
    workers = int(os.environ.get("COMPILE_JOBS", os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        failures = [line for lines in pool.map(compile_spec, jobs) for line in lines]
    print(f"compiled {len(jobs)} (spec, arch) jobs; {len(failures)} failures")
    for line in failures:
        print(line)
    return 1 if failures else 0


def test_every_launched_specialization_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(Path(__file__))], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]


if __name__ == "__main__":
    sys.exit(main())
