#!/usr/bin/env bash
# The one call on a lent GPU machine (it has its own torch and Triton, and no internet): check that the
# package imports, build the extension for sm_90 against that torch, run the GPU tests, then the GPU
# sweeps. Every stage logs to $OUT as it runs, under a timeout, and the sweeps write their CSV/JSON
# after every problem, so a run cut short still returns what it did. Everything fits in DEADLINE
# seconds (under 8 minutes). Written without a GPU at hand: its first real run is its test.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-$(date +%F)}"
DEADLINE="${DEADLINE:-470}"
mkdir -p "$OUT"

left() { echo $((DEADLINE - SECONDS)); }
run() {  # run NAME LIMIT CMD...: log to $OUT/NAME.txt within LIMIT seconds (and the deadline), go on after a failure
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  if [ "$(left)" -lt 20 ] || [ "$limit" -lt 10 ]; then
    echo "$name: skipped, $(left)s left" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - start))s (limit ${limit}s)" | tee -a "$OUT/summary.txt"
}
budget() { local b=$(($1 - 45)); echo $((b > 5 ? b : 5)); }  # the sweep's --time-budget inside a LIMIT

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
run import 60 python -c "import torch, triton, fused_attention
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print(torch.cuda.get_device_name()); print(fused_attention.info())"
run build 240 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 pip install --no-build-isolation --no-deps -e .
run info 30 python -m fused_attention info
run check 60 python -m fused_attention check

# GPU tests (each kernel family adds its own line here).
run tests_gpu 150 python -m pytest -q -x tests/test_extension.py tests/test_position.py tests/test_position_modules.py \
  tests/test_triton_positional.py tests/test_attention.py -k "cuda or triton or not cpu"
run tests_gpu_triton_attention 150 python -m pytest -q tests/test_triton_attention.py -k gpu
run tests_gpu_graphs 60 python -m pytest -q tests/test_cuda_graphs.py

# Sweeps: position kernels, FlashAttention's published sweep (no FlexAttention: a compile per shape),
# then the full preset, FlexAttention included, for whatever time is left.
run bench_position 60 python benchmarks/position.py --device cuda --out "$OUT/bench-position"
limit=$((($(left) - 30) / 2))
run bench_flash "$limit" python -m fused_attention bench --preset flash --modes fwd fwd+bwd --exclude flex \
  --min-run-time 0.1 --time-budget "$(budget "$limit")" --out "$OUT/bench-flash"
limit=$(($(left) - 15))
run bench_full "$limit" python -m fused_attention bench --full --min-run-time 0.1 \
  --time-budget "$(budget "$limit")" --out "$OUT/bench-full"
tail -n 3 "$OUT"/*.txt
