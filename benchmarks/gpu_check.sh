#!/usr/bin/env bash
# The one call on a lent GPU machine (it has its own torch and Triton, and no internet): measure the
# card's two ceilings, build the extension for sm_90 against that torch (in the background, while the
# Triton tests run), run the GPU tests, then the GPU sweeps. Every stage logs under a timeout to a work
# folder, which is packed into $OUT/gpu_logs.tgz after each stage (the device tool returns at most 8
# files), so a run cut short still returns what it did. Everything fits in DEADLINE seconds (480 by
# default: with the machine's start, about 10 of a session's 15 device minutes, leaving one short call).
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh        # OUT defaults to benchmarks/results/gpu-DATE
#     STAGES="profile tests_triton bench_train" DEADLINE=270 bash benchmarks/gpu_check.sh   # some stages
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-$(date +%F)}"
DEADLINE="${DEADLINE:-480}"
STAGES="${STAGES:-ceilings build profile tests_triton bench_flash bench_decode bench_short}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

left() { echo $((DEADLINE - SECONDS)); }
want() { [[ " $STAGES " == *" $1 "* ]]; }
pack() { cp "$WORK/summary.txt" "$OUT/summary.txt" 2>/dev/null; tar czf "$OUT/gpu_logs.tgz" -C "$WORK" . 2>/dev/null; }
note() { echo "$*" | tee -a "$WORK/summary.txt"; pack; }
run() {  # run NAME LIMIT CMD...: log to $WORK/NAME.txt within LIMIT seconds (and the deadline), go on after a failure
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  if [ "$(left)" -lt 15 ] || [ "$limit" -lt 10 ]; then
    note "$name: skipped, $(left)s left"
    return
  fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$WORK/$name.txt" 2>&1
  local rc=$?
  note "$name: exit $rc in $((SECONDS - start))s (limit ${limit}s) | $(grep -E '(passed|failed|error)' "$WORK/$name.txt" | tail -n 1)"
}
budget() { local b=$(($1 - 30)); echo $((b > 5 ? b : 5)); }  # a sweep's --time-budget inside a LIMIT
PYTEST=(python -m pytest -q -p no:cacheprovider -rfE --timeout 120 --durations 10)

nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1
run versions 60 python -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
want ceilings && run ceilings 40 python benchmarks/gpu_ceilings.py

# The extension builds on the CPUs while the Triton tests (which do not need it) run on the GPU.
if want build; then
  ( env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 FUSED_ATTENTION_FORCE_CUDA_BUILD=1 \
      timeout 240 python setup.py build_ext --inplace > "$WORK/build.txt" 2>&1; echo "build: exit $?" >> "$WORK/build.txt" ) &
  BUILD=$!
fi
want profile && run profile 45 python benchmarks/gpu_profile.py
# The shortest files first: test_triton_attention.py autotunes each feature set (minutes in all).
want tests_triton && run tests_triton "${TESTS_LIMIT:-180}" "${PYTEST[@]}" -n 12 --junitxml "$WORK/tests_triton.xml" \
  tests/test_kvcache_triton.py tests/test_sinks.py::test_triton_sinks tests/test_cuda_graphs.py \
  tests/test_triton_decode_route.py tests/test_triton_positional.py tests/test_triton_attention.py
if want build; then
  wait "$BUILD"
  note "$(tail -n 1 "$WORK/build.txt") after ${SECONDS}s"
  run info 30 python -m fused_attention info
  # The extension crashed (SIGSEGV) there when an op raised (2026-12-04): the toolchain, and one raise in a
  # child process whose exit status and traceback are logged.
  run extension_raise 30 bash -c 'command -v c++ g++; g++ --version | head -n 1; ldd fused_attention/_C*.so | grep -E "stdc|gcc_s|gomp|c10"
    python -X faulthandler -c "import torch, fused_attention
try:
    torch.ops.fused_attention.add_sinusoidal_position_encoding(torch.randn(2, 4, 5), None, 0, 10000.0)
except RuntimeError as error:
    print(\"raised as it should:\", str(error).splitlines()[0])"; echo "child exit status $?"'
  run tests_extension 45 "${PYTEST[@]}" -n 4 tests/test_extension.py tests/test_position.py tests/test_position_modules.py
fi

# Sweeps, ours against torch's SDPA in the same run: FlashAttention's published sweep (16k tokens, hidden
# 2048), the shapes models run (a BERT batch of 128 tokens, a small training call), and decode steps.
BENCH=(python -m fused_attention bench --min-run-time 0.1)
want bench_train && run bench_train "$(left)" "${BENCH[@]}" --preset flash --seq 1024 4096 --modes fwd+bwd \
  --providers triton torch-sdpa --time-budget "$(budget "$(left)")" --out "$WORK/bench-train"
# Issue 14's goal shapes first (head dim 128, L = S = 4k, 8k, 16k), then the rest of the sweep.
want bench_flash && run bench_flash 100 "${BENCH[@]}" --preset flash --dim 128 64 --seq 4096 8192 16384 1024 2048 512 \
  --modes fwd fwd+bwd --providers triton torch-sdpa torch-cudnn --time-budget "$(budget 100)" --out "$WORK/bench-flash"
want bench_decode && run bench_decode 45 "${BENCH[@]}" --preset decode --providers triton ours-paged torch-sdpa \
  --time-budget "$(budget 45)" --out "$WORK/bench-decode"
want bench_short && run bench_short 45 "${BENCH[@]}" --ops plain causal padding --seq 128 512 --batch 8 --heads 12 --dim 64 \
  --modes fwd fwd+bwd --providers triton torch-sdpa --time-budget "$(budget 45)" --out "$WORK/bench-short"
note "done in ${SECONDS}s"
tail -n 25 "$WORK"/bench_*.txt 2>/dev/null
