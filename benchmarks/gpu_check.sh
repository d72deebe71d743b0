#!/usr/bin/env bash
# The one call on a lent GPU machine (it has its own torch and no internet): build the extension
# against that torch, run what needs a GPU, and leave every log under $OUT for benchmarks/results/.
# Written without a GPU at hand: its first real run is its test.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-$(date +%F)}"
mkdir -p "$OUT"
run() {  # run NAME CMD...: log to $OUT/NAME.txt, keep going on failure, record the exit status
  local name=$1 start=$SECONDS
  shift
  "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
run build env MAX_JOBS=16 pip install --no-build-isolation --no-deps -e .
run info python -m fused_attention info
run check python -m fused_attention check
run tests_gpu python -m pytest -q -x tests/test_extension.py tests/test_position.py tests/test_position_modules.py \
  tests/test_triton_positional.py tests/test_attention.py -k "cuda or triton or not cpu"
run bench_position python benchmarks/position_cpu.py --device cuda
run bench_position_triton python benchmarks/position_cpu.py --device cuda --backend triton
tail -n 3 "$OUT"/*.txt
