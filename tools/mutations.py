"""Mutation check: does the test suite catch small semantic bugs planted in the package?

Each mutation replaces one exact snippet of one file (it must occur exactly once, else the mutation is
reported ``stale``: the code moved and the list needs an update) in a temporary copy of the repository,
then runs the test selection that must catch it (``pytest -x``: the first failure ends the run). A
mutation is ``caught`` when the tests fail, ``survived`` when they pass. C++ mutations (``--cpp``)
rebuild the extension in the copy (C++ only, a few minutes each) before testing.

Not part of the default CI run (minutes per mutation on a small machine). Run from the repository root::

    python tools/mutations.py                   # the Python mutations
    python tools/mutations.py --cpp             # and the C++ ones (scratch builds)
    python tools/mutations.py --cpp-only        # only the C++ ones
    python tools/mutations.py --only planted,hf  # names containing "planted" or "hf"
    python tools/mutations.py --out benchmarks/results/mutations.md

The first five are the bugs planted by the audit of issue 19; each names the test that now catches it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files and -k selections
    what: str  # the bug, in words
    cpp: bool = False


def _k(files: str | tuple[str, ...], selection: str) -> tuple[str, ...]:
    files = (files,) if isinstance(files, str) else files
    return (*files, "-k", selection)


ATT, VARLEN, CHUNKED = "tests/test_attention.py", "tests/test_varlen.py", "tests/test_chunked.py"
DIST = "tests/test_distributed.py"
CHUNKED_PY, RULES = "fused_attention/kernels/chunked.py", "fused_attention/ops/attention_rules.py"

MUTATIONS = [
    # --- the audit's planted bugs (issue 19) ---
    Mutation(
        "planted-1 alibi-sign", CHUNKED_PY,
        "scores.sub_(alibi.to(cd)[:, :, None, None] * self.distance)",
        "scores.add_(alibi.to(cd)[:, :, None, None] * self.distance)",
        _k(ATT, "torch and single_feature and alibi"), "torch backend: ALiBi bias added instead of subtracted",
    ),
    Mutation(
        "planted-2 sdpa-drops-scale", "fused_attention/backends/torch_backend.py",
        "is_causal=inputs.causal, scale=inputs.scale, enable_gqa=",
        "is_causal=inputs.causal, enable_gqa=",
        _k("tests/test_dispatch.py", "forced_torch_backend_matches_torch"),
        "torch backend: the inference call to torch's SDPA drops scale=",
    ),
    Mutation(
        "planted-3 cpu-varlen-slope-grad-negated", "fused_attention/backends/cpu_backend.py",
        "*varlen_autograd_rules(ops.varlen_attention_backward.default, sinks=True)",
        "*varlen_autograd_rules(lambda *a: (lambda r: (*r[:3], -r[3], *r[4:]))"
        "(ops.varlen_attention_backward.default(*a)), sinks=True)",
        _k(VARLEN, "cpu and alibi_slopes_gradient"), "cpu backend: varlen ALiBi slope gradient negated",
    ),
    Mutation(
        "planted-4 chunked-16bit-arithmetic", CHUNKED_PY,
        "return torch.float64 if dtype == torch.float64 else torch.float32",
        "return dtype",
        _k(ATT, "torch and float32_arithmetic_bound"),
        "torch backend: 16-bit inputs computed in 16-bit (the docstring promises float32)",
    ),
    Mutation(
        "planted-5 window-dropout-never-drops", CHUNKED_PY,
        "self.keep = (rand >= rules.dropout_p).to(cd)",
        "self.keep = ((rand >= rules.dropout_p) | (rules.window_left >= 0) | (rules.window_right >= 0)).to(cd)",
        _k(ATT, "torch and dropout_keeps"), "windowed calls with dropout rescale by 1/(1-p) but never drop",
    ),
    # --- torch backend (chunked math, varlen op) ---
    Mutation(
        "chunked-causal-hides-diagonal", CHUNKED_PY, "visible &= j <= i", "visible &= j < i",
        _k(ATT, "torch and single_feature and causal and float32"), "causal hides the diagonal",
    ),
    Mutation(
        "chunked-window-left-off-by-one", CHUNKED_PY,
        "visible &= j >= pos - rules.window_left", "visible &= j > pos - rules.window_left",
        _k(ATT, "torch and single_feature and window and float32"), "window sees one key too few on the left",
    ),
    Mutation(
        "chunked-key-lengths-off-by-one", CHUNKED_PY,
        "lengths = j < key_lengths.reshape(-1, 1, 1, 1)", "lengths = j <= key_lengths.reshape(-1, 1, 1, 1)",
        _k(ATT, "torch and single_feature and key_lengths"), "key_lengths lets one padded key in",
    ),
    Mutation(
        "chunked-key-range-window-right", CHUNKED_PY,
        "hi = min(hi, i1 - 1 + shift + rules.window_right + 1)", "hi = min(hi, i1 - 1 + shift + rules.window_right)",
        (CHUNKED, "-k", "many_chunks"), "a chunk's key range drops the last row's rightmost visible key",
    ),
    Mutation(
        "chunked-softcap-backward", CHUNKED_PY, "ds.mul_(1 - c.tanh * c.tanh)", "ds.mul_(1 - c.tanh)",
        _k(ATT, "torch and single_feature and softcap"), "softcap's backward uses the wrong derivative",
    ),
    Mutation(
        "chunked-dk-overwritten", CHUNKED_PY,
        "dk[:, :, j0:j1] += ds.transpose(-2, -1) @ c.q", "dk[:, :, j0:j1] = ds.transpose(-2, -1) @ c.q",
        (CHUNKED, "-k", "many_chunks"), "dk of a key block keeps only the last query chunk",
    ),
    Mutation(
        "chunked-dropout-dv-unmasked", CHUNKED_PY,
        "p_kept = p if c.keep is None else p * c.keep", "p_kept = p",
        _k(ATT, "torch and dropout_keeps"), "the backward forgets the dropout mask for dv",
    ),
    Mutation(
        "chunked-dense-slope-grad-sign", CHUNKED_PY, "dalibi -= _reduce_to(", "dalibi += _reduce_to(",
        _k(ATT, "torch and alibi_slopes_gradient"), "dense ALiBi slope gradient negated (torch backend)",
    ),
    Mutation(
        "chunked-lse", CHUNKED_PY, "lse = (row_max + total.log()).squeeze(-1)",
        "lse = (row_max + total.log1p()).squeeze(-1)",
        _k(ATT, "torch and single_feature and plain"), "the returned log-sum-exp is off",
    ),
    Mutation(
        "torch-varlen-per-sequence-slopes", "fused_attention/ops/torch_varlen.py",
        "dalibi[b if alibi.shape[0] > 1 else 0] += grads[4][0]", "dalibi[0] += grads[4][0]",
        _k(VARLEN, "torch and alibi_slopes_gradient"), "per-sequence (B, H) slope gradients summed into row 0",
    ),
    # --- the ops' autograd rules ---
    Mutation(
        "autograd-dense-dk-dv-swapped", RULES, "dq, dk, dv, dmask if need_mask_grad else None,",
        "dq, dv, dk, dmask if need_mask_grad else None,",
        _k(ATT, "cpu and single_feature and plain and float32"), "dense backward returns dk and dv swapped",
    ),
    Mutation(
        "autograd-dense-mask-grad-sign", RULES, "dq, dk, dv, dmask if need_mask_grad else None,",
        "dq, dk, dv, -dmask if need_mask_grad else None,",
        _k(ATT, "cpu and single_feature and float_mask"), "the gradient of a float mask negated",
    ),
    Mutation(
        "autograd-varlen-dq-scaled", RULES, "            dq, dk, dv, None, None, dalibi if need_alibi_grad",
        "            dq * 1.001, dk, dv, None, None, dalibi if need_alibi_grad",
        _k(VARLEN, "varlen_matches_reference and plain and float32"), "varlen dq off by 0.1%",
    ),
    # --- input canonicalization and dispatch ---
    Mutation(
        "inputs-default-scale", "fused_attention/argument_checks.py",
        "return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0",
        "return 1.0 / math.sqrt(head_dim + 1) if head_dim > 0 else 1.0",
        _k(ATT, "single_feature and plain and float32"), "the default scale is not 1/sqrt(E)",
    ),
    Mutation(
        "dispatch-ignores-env-var", "fused_attention/backends/dispatch.py",
        "raw = _ENV_DATA.get(_ENV_KEY)", "raw = None",
        _k("tests/test_dispatch.py", "env_var"), "FUSED_ATTENTION_BACKEND is ignored",
    ),
    # --- integrations and modules ---
    Mutation(
        "hf-sliding-window-off-by-one", "fused_attention/integrations/huggingface.py",
        "window = (sliding_window - 1, 0) if causal else", "window = (sliding_window, 0) if causal else",
        ("tests/test_huggingface.py",), "transformers' causal sliding window sees one key too many",
    ),
    Mutation(
        "hf-dropout-in-eval", "fused_attention/integrations/huggingface.py",
        "dropout_p=dropout if module.training else 0.0", "dropout_p=dropout",
        _k("tests/test_huggingface.py", "dropout"), "attention dropout applied in eval mode",
    ),
    Mutation(
        "patching-skips-backend", "fused_attention/integrations/patching.py",
        "MultiheadAttention.from_torch_(module, backend=backend)", "MultiheadAttention.from_torch_(module)",
        _k("tests/test_patching.py", "backend"), "patch_model forgets the forced backend",
    ),
    Mutation(
        "nn-weights-summed-over-heads", "fused_attention/nn/multihead.py",
        "weights = (weights.mean(dim=1) if average_attn_weights else weights)",
        "weights = (weights.sum(dim=1) if average_attn_weights else weights)",
        _k("tests/test_nn_attention.py", "multihead_attention_matches_torch"),
        "need_weights sums the weights over heads instead of averaging",
    ),
    # --- position encodings ---
    Mutation(
        "alibi-slopes-shifted", "fused_attention/position.py",
        "return [2 ** (-8 * k / n) for k in range(1, n + 1)]", "return [2 ** (-8 * k / n) for k in range(n)]",
        ("tests/test_position.py", "tests/test_position_modules.py"), "ALiBi slopes start at 1 instead of 2^(-8/n)",
    ),
    Mutation(
        "rope-backward-not-inverse", "fused_attention/kernels/position_torch.py",
        "    if conjugate:\n        s = -s\n", "    if conjugate:\n        s = s\n",
        _k("tests/test_position.py", "rope and torch"), "RoPE's backward rotates forward instead of back",
    ),
    Mutation(
        "sinusoidal-sin-cos-swapped", "fused_attention/kernels/position_torch.py",
        "torch.stack((angles.sin(), angles.cos()), dim=-1)", "torch.stack((angles.cos(), angles.sin()), dim=-1)",
        _k("tests/test_position.py", "sinusoidal"), "sinusoidal table with sin and cos swapped",
    ),
    # --- Triton kernels (under the interpreter on CPU) ---
    Mutation(
        "triton-alibi-sign", "fused_attention/kernels/triton/attention_tiles.py",
        "return slope * tl.abs((i + shift - j).to(tl.float32))", "return -slope * tl.abs((i + shift - j).to(tl.float32))",
        _k("tests/test_triton_attention.py", "alibi"), "Triton: ALiBi bias added instead of subtracted",
    ),
    Mutation(
        "triton-dropout-never-drops", "fused_attention/kernels/triton/attention_tiles.py",
        "return r >= threshold", "return r >= 0",
        _k(ATT, "triton and dropout_keeps"), "Triton: dropout rescales but never drops",
    ),
    Mutation(
        "triton-key-bound-past-length", "fused_attention/kernels/triton/attention_tiles.py",
        "last = tl.minimum(last, key_length - 1)", "last = tl.minimum(last, key_length)",
        _k("tests/test_triton_attention.py", "key_lengths"), "Triton: a masked tile shows each row one key past its length",
    ),
    Mutation(
        "triton-zero-scale-kept", "fused_attention/kernels/triton/attention_forward.py",
        "qk_scale = tl.where(scale == 0, 1.0, tl.abs(qk_scale))", "qk_scale = tl.abs(qk_scale)",
        _k("tests/test_triton_attention.py", "negative_and_zero_scale"),
        "Triton: a zero scale multiplies a hidden key's -inf (NaN)",
    ),
    Mutation(
        "triton-left-edge-checks-right", "fused_attention/kernels/triton/attention_forward.py",
        "(2, 0, 1, 3)[part]", "(1, 0, 1, 3)[part]",
        _k("tests/test_triton_attention.py", "wider_than"),
        "Triton: the window's left-edge tiles check the right bound instead of the left",
    ),
    Mutation(
        "triton-narrow-window-one-sided", "fused_attention/kernels/triton/attention_forward.py",
        "    narrow = a0 < a\n", "    a0 = a\n    narrow = a0 < a\n",
        _k("tests/test_triton_attention.py", "window"),
        "Triton: a window narrower than a tile still checks one bound per left-edge tile",
    ),
    Mutation(
        "triton-dkdv-tile-without-flags", "fused_attention/kernels/triton/attention_backward.py",
        'fixed_tile(attention_dkdv_kernel, "backward_dkdv", shared | flags)',
        'fixed_tile(attention_dkdv_kernel, "backward_dkdv", shared)',
        _k("tests/test_triton_tile_choice.py", "before_the_launch"),
        "Triton: the dK/dV tile sized before the launch ignores the mask gradient's tile rules",
    ),
    Mutation(
        "triton-spilling-tile-kept", "fused_attention/kernels/triton/attention_launch.py",
        "        return [tile for tile, count in zip(tiles, counts) if count is None or count == 0]",
        "        return tiles",
        _k("tests/test_triton_tile_choice.py", "spill"),
        "Triton: the autotuner keeps tiles the compiler spills for",
    ),
    # --- context parallelism (spawned gloo ranks, one group size) ---
    Mutation(
        "ring-block-backward-delta", "fused_attention/distributed/block_backward.py",
        "torch.where(seen, c * (rho - c * delta[:, :, rows]), 0)", "torch.where(seen, c * (rho - delta[:, :, rows]), 0)",
        _k(DIST, "ring_zigzag_f64_causal and 2"), "ring backward: the upstream's t misses a factor c on D",
    ),
    Mutation(
        "ring-sink-grad-sign", "fused_attention/distributed/ring.py",
        "dsinks = -(p_sink * delta)", "dsinks = (p_sink * delta)",
        _k(DIST, "ring_zigzag_f32_causal_gqa_sinks and 2"), "ring: the sinks' gradient negated",
    ),
    Mutation(
        "ring-slope-grad-sign", "fused_attention/distributed/slope_grad.py",
        "return -((a - r / n * b) / n).sum(-1)", "return ((a - r / n * b) / n).sum(-1)",
        _k(DIST, "ring_zigzag_f64_alibi_causal and 2"), "ring: the ALiBi slopes' gradient negated",
    ),
    Mutation(
        "triton-split-kv-boundary", "fused_attention/kernels/triton/kvcache_decode.py",
        "hi = tl.minimum(lo + per_split * BLOCK_N, total)", "hi = tl.minimum(lo + per_split * BLOCK_N - 1, total)",
        _k("tests/test_kvcache_triton.py", "long_cache"), "Triton split-KV: the last key of each split is dropped",
    ),
    Mutation(
        "triton-combine-drops-sinks", "fused_attention/kernels/triton/kvcache_combine.py",
        "        total += tl.exp(sink - base)", "        total += 0.0",
        _k("tests/test_kvcache_triton.py", "combine"), "Triton split-KV combine: the sinks leave the normalizer",
    ),
    Mutation(
        "triton-autotuner-zeroes-none", "fused_attention/kernels/triton/attention_launch.py",
        "            if args.get(name) is not None:", "            if name in args:",
        _k("tests/test_triton_tile_choice.py", "zeroes"), "Triton autotuner: zeroes an absent (None) accumulator",
    ),
    Mutation(
        "triton-tuned-key-misses-dtype", "fused_attention/kernels/triton/attention_launch.py",
        '            *(getattr(value, "dtype", None) for value in args.values()))', "            )",
        _k("tests/test_triton_tile_choice.py", "tuned_key"), "Triton: a tuned config reused for another dtype",
    ),
    Mutation(
        "triton-dkdv-split-repeats-heads", "fused_attention/kernels/triton/attention_backward.py",
        "for g in range(split * per_split, (split + 1) * per_split):", "for g in range(0, per_split):",
        _k("tests/test_triton_attention.py", "split"), "Triton: every dK/dV split walks the group's first heads",
    ),
    Mutation(
        "triton-one-hot-rows-not-zeroed", "fused_attention/kernels/triton/attention_backward.py",
        "dq = tl.where(one_hot[:, None], 0.0, dq * scale)", "dq = dq * scale",
        _k("tests/test_triton_attention.py", "odd_sizes and 97-1-40"),
        "Triton: rows that see one key keep delta's rounding noise in dQ",
    ),
    Mutation(
        "triton-decode-route-drops-window", "fused_attention/backends/triton_decode.py",
        "window=(inputs.window_left, inputs.window_right)", "window=(-1, -1)",
        _k("tests/test_triton_decode_route.py", "matches_the_reference"),
        "Triton: decode steps sent to the split-KV kernel lose their window (and lower-right causal rule)",
    ),
    # --- C++ kernels (--cpp: a scratch build each) ---
    Mutation(
        "cpp-slope-grad-sign", "csrc/cpu/attention_backward.h",
        "step_alibi -= distance_dot(dp,",
        "step_alibi += distance_dot(dp,",
        _k((ATT, VARLEN), "cpu and alibi_slopes_gradient"), "C++: ALiBi slope gradient negated", cpp=True,
    ),
    Mutation(
        "cpp-split-backward-drops-a-part", "csrc/cpu/attention_backward.h",
        "for (size_t p = 1; p < parts.size(); ++p) {", "for (size_t p = 2; p < parts.size(); ++p) {",
        _k("tests/test_cpu_backward_split.py", "matches_reference"),
        "C++: a split backward task's dK, dV miss its second part", cpp=True,
    ),
    Mutation(
        "cpp-causal-hides-diagonal", "csrc/cpu/attention_problem.h",
        "if (causal) hi = std::min(hi, i + 1);", "if (causal) hi = std::min(hi, i);",
        _k(ATT, "cpu and single_feature and causal"), "C++: causal hides the diagonal", cpp=True,
    ),
    Mutation(
        "cpp-dropout-never-drops", "csrc/cpu/attention_rows.h",
        "dropout.keep(row_key, j0 + j) ? scale : acc_t(0);", "dropout.keep(row_key, j0 + j) ? scale : scale;",
        _k(ATT, "cpu and dropout_keeps"), "C++: dropout rescales but never drops", cpp=True,
    ),
    Mutation(
        "cpp-decode-merge-unscaled", "csrc/cpu/attention_decode.h",
        "const acc_t factor = std::exp(m - top);", "const acc_t factor = acc_t(1);",
        _k("tests/test_cpu_decode.py", "split_with_each_feature"),
        "C++: decode key chunks merged without their log-sum-exp rescale", cpp=True,
    ),
    Mutation(
        "cpp-pair-tasks-pack-one-head", "csrc/cpu/attention_forward.h",
        "tiles.load(problem, s, kv_head);", "tiles.load(problem, s, 0);",
        _k("tests/test_cpu_forward_pairs.py", "match_the_reference"),
        "C++: forward tasks that own a (sequence, kv head) pair pack the first kv head's K and V", cpp=True,
    ),
    Mutation(
        "cpp-paged-rows-unpaged", "csrc/cpu/attention_problem.h",
        "return pages ? page_size - token % page_size : std::numeric_limits<int64_t>::max();",
        "return std::numeric_limits<int64_t>::max();",
        _k("tests/test_kvcache_cpu.py", "long_caches"),
        "C++: the decode kernel reads a paged cache's rows past the end of their page", cpp=True,
    ),
    Mutation(
        "cpp-bf16-values-unpermuted", "csrc/cpu/attention_decode_widen.h",
        "_mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23)",
        "_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)",
        _k("tests/test_kvcache_cpu.py", "bfloat16_decode"),
        "C++: the bfloat16 decode's P V adds its widened even and odd features in the wrong order (CPUs "
        "with AVX-512)", cpp=True,
    ),
    Mutation(
        "cpp-stats-backward-drops-delta", "csrc/cpu/attention_backward.h",
        "      delta = scoring.row_delta[at];", "      delta = 0;",
        _k("tests/test_backward_stats.py", "matches_autograd"),
        "C++: the backward given the rows' statistics ignores the given delta", cpp=True,
    ),
    Mutation(
        "cpp-direct-takes-any-tensor", "csrc/cpu/attention_ops.cpp",
        "plain.isSupersetOf(t.key_set())", "true",
        _k("tests/test_direct_call.py", "negative_view"),
        "C++: the direct entry takes any strided tensor (a negative view is read un-negated)", cpp=True,
    ),
]


def _copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files, plus the built extension."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for built in (ROOT / "fused_attention").glob("_C*.so"):
        shutil.copy2(built, dest / "fused_attention" / built.name)


def _env(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_ATTENTION_") or k.endswith("_CUDA_BUILD")}
    env["PYTHONPATH"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _build(copy: Path, log: Path) -> bool:
    env = _env(copy) | {"FUSED_ATTENTION_SKIP_CUDA_BUILD": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    with log.open("w") as out:
        result = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy, env=env,
                                stdout=out, stderr=subprocess.STDOUT, check=False)
    return result.returncode == 0


def run_one(m: Mutation, copy: Path, timeout: float) -> tuple[str, float, str]:
    """``(status, seconds, detail)``, the copy restored afterwards."""
    target = copy / m.path
    original = target.read_text()
    if original.count(m.old) != 1:
        return "stale", 0.0, f"snippet found {original.count(m.old)} times in {m.path}"
    start = time.perf_counter()
    saved_so = [(p, p.read_bytes()) for p in (copy / "fused_attention").glob("_C*.so")] if m.cpp else []
    try:
        target.write_text(original.replace(m.old, m.new))
        if m.cpp and not _build(copy, copy / "mutation-build.log"):
            return "build failed", time.perf_counter() - start, "see mutation-build.log"
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
        try:
            result = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True,
                                    timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start, f"over {timeout:.0f} s"
        lines = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-200:]
        if result.returncode == 0:
            return "survived", time.perf_counter() - start, summary
        if result.returncode == 5:
            return "no tests", time.perf_counter() - start, summary
        return "caught", time.perf_counter() - start, (lines[0] if lines else summary)[:160]
    finally:
        target.write_text(original)
        for path, data in saved_so:
            path.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpp", action="store_true", help="also the C++ mutations (a scratch build each)")
    parser.add_argument("--cpp-only", action="store_true", help="only the C++ mutations")
    parser.add_argument("--only", default="", help="run mutations whose name contains one of these (comma-separated)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation's tests")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    wanted = args.only.split(",")
    chosen = [m for m in MUTATIONS if any(w in m.name for w in wanted) and (args.cpp or args.cpp_only or not m.cpp)]
    chosen = [m for m in chosen if m.cpp or not args.cpp_only]
    rows = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=False).stdout.strip()  # what the copy is made of
    with tempfile.TemporaryDirectory(prefix="fa-mutations-") as tmp:
        copy = Path(tmp)
        _copy_repo(copy)
        for m in chosen:
            status, seconds, detail = run_one(m, copy, args.timeout)
            rows.append((m, status, seconds, detail))
            print(f"{status:9s} {seconds:6.0f} s  {m.name}: {detail}", flush=True)
    caught = sum(r[1] == "caught" for r in rows)
    lines = [
        f"# Mutation check: {caught} of {len(rows)} caught",
        "",
        (f"`python tools/mutations.py{' --cpp' if args.cpp else ''}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
        f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end."),
        "",
        "| mutation | file | bug | status | seconds | tests run | first failure / summary |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, status, seconds, detail in rows:
        tests = " ".join(m.tests).replace("|", "\\|")
        lines.append(f"| {m.name} | `{m.path}` | {m.what} | {status} | {seconds:.0f} | `{tests}` | "
                     f"{detail.replace('|', '/')} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
