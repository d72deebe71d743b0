#!/usr/bin/env bash
# The oldest torch we claim, as a new user gets it, in its own venv under WORKDIR:
#   1. a C++ build that fails (CXX=false) still installs, with the reason recorded; forced, it fails;
#   2. the wheel builds against torch OLDEST_TORCH (C++ kernels; CUDA is proven by the main build);
#   3. installed into a venv that has only torch (with its Triton, and no numpy), `info`, `check` and a
#      tiny `bench` work;
#   4. with the test tools added, a representative slice of the suite passes: three evenly spaced cases of
#      every test function of the files below (all 1182 took 2 of CI's 30 minutes; the main suite runs
#      every case on the newest torch), Triton under its interpreter on one case of each shared test
#      function and dtype.
# Usage: .ci/oldest_torch.sh WORKDIR [--prepare]   (--prepare: only step 0, the venv with torch, which
# .ci/run starts early in the background)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

OLDEST_TORCH=${OLDEST_TORCH:-2.6.0}
WORK=${1:?usage: $0 WORKDIR}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
VENV="$WORK/venv-torch-$OLDEST_TORCH"
SRC="$WORK/src"
PY="$VENV/bin/python"
# This stage builds C++ only, whatever the caller forces for the main build.
unset FUSED_ATTENTION_FORCE_CUDA_BUILD FUSED_ATTENTION_FORCE_CPP_BUILD
export FUSED_ATTENTION_SKIP_CUDA_BUILD=1

step() { echo "--- $* (${SECONDS}s)"; }

prepare() {
  rm -f "$VENV.prepared"
  python3 -m venv --clear "$VENV"
  "$PY" -m pip install -q --no-compile "torch==$OLDEST_TORCH"  # as .ci/run: bytecode on import
  touch "$VENV.prepared"
}
if [ "${2:-}" = "--prepare" ]; then
  prepare
  exit
fi
if [ ! -f "$VENV.prepared" ]; then
  step "fresh venv with torch==$OLDEST_TORCH only"
  prepare
fi
"$PY" -W ignore -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# A copy of the tree (tracked and new files, no build outputs), so this build shares nothing with the
# main one: not its build/ directory, not the extension built in place for the main venv's torch.
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC"

# The build tools the README's commands install (an older torch pulls no setuptools with bdist_wheel).
"$PY" -m pip install -q setuptools wheel ninja
wheel_build() { (cd "$SRC" && "$PY" -m pip wheel --no-build-isolation --no-deps -w "$@" .); }

step "a failing C++ build (CXX=false) installs without the extension"
# -v: pip shows a successful build's output (where the warning is) only when asked.
CXX=false wheel_build "$WORK/dist-failed" -v > "$WORK/failed-build.log" 2>&1
grep -q "fused_attention WARNING: the compiled extension fused_attention._C could not be built" \
  "$WORK/failed-build.log" || { cat "$WORK/failed-build.log"; exit 1; }
contents=$(unzip -l "$WORK"/dist-failed/fused_attention-*.whl)
if echo "$contents" | grep -q "_C\..*so" || ! echo "$contents" | grep -q "_C_build_failure.txt"; then
  echo "$contents"; exit 1
fi
step "... and fails with FUSED_ATTENTION_FORCE_CPP_BUILD=1"
if CXX=false FUSED_ATTENTION_FORCE_CPP_BUILD=1 wheel_build "$WORK/dist-forced" -q > /dev/null 2>&1; then
  echo "a forced C++ build succeeded with CXX=false"; exit 1
fi

step "wheel against torch $OLDEST_TORCH (FUSED_ATTENTION_FORCE_CPP_BUILD=1, MAX_JOBS=${MAX_JOBS:-})"
rm -rf "$WORK/dist" "$SRC/build"
FUSED_ATTENTION_FORCE_CPP_BUILD=1 wheel_build "$WORK/dist" -q

step "the wheel in the venv with only torch: info, check, bench"
"$PY" -m pip uninstall -q -y wheel ninja  # back to a fresh venv's tools (pip, setuptools)
"$PY" -m pip install -q "$WORK"/dist/fused_attention-*.whl
if "$PY" -c "import numpy" 2> /dev/null; then echo "numpy is installed: this would not test a clean install"; exit 1; fi
cd "$WORK"  # away from the source tree: the installed package is what runs
"$PY" -m fused_attention info | tee "$WORK/info.txt"
grep -E "^  cpu +available" "$WORK/info.txt" > /dev/null || { echo "the cpu backend is not available"; exit 1; }
"$PY" -m fused_attention check
"$PY" -m fused_attention bench --ops plain rope --providers cpu torch-sdpa naive --seq 64 --batch 1 --heads 2 \
  --dim 32 --modes fwd --min-run-time 0.01 --out "$WORK/bench"

step "test slice on torch $OLDEST_TORCH"
# numpy < 2.3: Triton 3.2's interpreter converts 1-element arrays to scalars, which the newest numpy
# refuses (2.2 still accepts it).
# The newest transformers still takes torch 2.6.
"$PY" -m pip install -q --no-compile pytest pytest-xdist hypothesis "numpy<2.3" transformers
# Tests run the copied tree with the extension built for this torch (some start subprocesses on it).
cp "$SRC"/build/lib*/fused_attention/_C*.so "$SRC/fused_attention/"
cd "$SRC"
"$PY" -m pytest -q -n auto --dist worksteal -p no:cacheprovider \
  tests/test_attention.py tests/test_varlen.py tests/test_position.py tests/test_extension.py \
  tests/test_dispatch.py tests/test_huggingface.py tests/test_platform.py tests/test_patching.py \
  tests/test_compile.py tests/test_functorch.py tests/test_encoder_feed_forward.py -k "not inductor" --triton-sample-per-test 1 --sample-per-test 3
cd "$REPO"
step "done"
