#!/usr/bin/env bash
# Builds csrc/ the way users on other platforms would, without their machines:
#   aarch64: Debian's aarch64-linux-gnu-g++ compiles every source with setup.py's flags against the
#            aarch64 wheel of the oldest torch we claim (CPU-only, so small), links the extension against
#            that wheel's libraries (every undefined symbol must resolve), checks that the generic kernel
#            variant came out as NEON code, and runs `info` and `check` on it under qemu-user with
#            Debian's aarch64 Python;
#   clang:   clang++ -fsyntax-only of every source, for x86-64 against the venv's torch and for aarch64
#            (clang on ARM, as on macOS) against the same torch's aarch64 wheel.
# Usage: .ci/cross_compile.sh WORKDIR (run in the CI venv; needs the apt packages .ci/run installs).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

WORK=${1:?usage: $0 WORKDIR}
JOBS=${MAX_JOBS:-2}
ARM_TORCH_VERSION=${AARCH64_TORCH:-2.6.0}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
step() { echo "--- $* (${SECONDS}s)"; }

read -r TORCH_VERSION PY_VERSION CXX11_ABI HOST_TORCH PY_INCLUDE < <(python - <<'EOF'
import os, sys, sysconfig
import torch
print(torch.__version__.split("+")[0], f"{sys.version_info[0]}.{sys.version_info[1]}",
      int(torch._C._GLIBCXX_USE_CXX11_ABI), os.path.dirname(torch.__file__), sysconfig.get_paths()["include"])
EOF
)
ARM_PY_VERSION=3.11  # Debian 12's python3.11, which runs the aarch64 build under qemu

download_aarch64() {  # DEST PYTHON_VERSION REQUIREMENT... : aarch64 wheels, unpacked into DEST
  local dest=$1 py=$2
  shift 2
  [ -f "$dest/.done" ] && return
  rm -rf "$dest" "$dest.wheels"
  python -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --platform manylinux2014_aarch64 --python-version "$py" -d "$dest.wheels" "$@"
  for wheel in "$dest.wheels"/*.whl; do python -m zipfile -e "$wheel" "$dest"; done
  rm -rf "$dest.wheels"
  touch "$dest/.done"
}

# The std flag torch's BuildExtension passes for these headers: C++20 once they need it, else C++17.
std_flag() { if grep -q "std::strong_ordering" "$1/c10/util/intrusive_ptr.h"; then echo -std=c++20; else echo -std=c++17; fi; }
# setup.py's C++ flags plus what BuildExtension adds (-Wno-psabi: GCC's notes on an ABI change in GCC 10).
# The host's Python headers stand in for aarch64's: both are LP64 Linux, and pybind11 needs the API only.
flags() {  # $1: torch include root, $2: the C++ ABI that torch was built with (0 or 1)
  echo "$(std_flag "$1") -fPIC -fopenmp -O3 -ffp-contract=fast -Wno-psabi -Icsrc -isystem $1" \
    "-isystem $1/torch/csrc/api/include -isystem $PY_INCLUDE -DTORCH_API_INCLUDE_EXTENSION_H" \
    "-DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=$2"
}
SOURCES=$(ls csrc/*.cpp csrc/cpu/*.cpp)

step "aarch64 torch $ARM_TORCH_VERSION (and what it imports) for python $ARM_PY_VERSION"
ARM_SITE="$WORK/aarch64-site-torch-$ARM_TORCH_VERSION"
download_aarch64 "$ARM_SITE" "$ARM_PY_VERSION" "torch==$ARM_TORCH_VERSION" filelock typing-extensions \
  "sympy==1.13.1" mpmath networkx jinja2 markupsafe fsspec
ARM_INCLUDE="$ARM_SITE/torch/include" ARM_LIB="$ARM_SITE/torch/lib"

step "aarch64-linux-gnu-g++: object files against torch $ARM_TORCH_VERSION"
OBJ="$WORK/aarch64-objects"
rm -rf "$OBJ" && mkdir -p "$OBJ"
cxx11_symbols=$(aarch64-linux-gnu-nm -D --defined-only "$ARM_LIB/libc10.so" | grep -c __cxx11 || true)
ARM_ABI=$([ "$cxx11_symbols" -gt 0 ] && echo 1 || echo 0)
ARM_FLAGS=$(flags "$ARM_INCLUDE" "$ARM_ABI")
export ARM_FLAGS OBJ
echo "$SOURCES" | xargs -P "$JOBS" -I{} sh -c \
  'aarch64-linux-gnu-g++ $ARM_FLAGS -c {} -o "$OBJ/$(echo {} | tr / _).o" || exit 255'

step "aarch64: link against torch's aarch64 libraries"
aarch64-linux-gnu-g++ -shared -fopenmp -o "$OBJ/_C.so" "$OBJ"/*.o -L"$ARM_LIB" -Wl,-rpath-link,"$ARM_LIB" \
  -lc10 -ltorch -ltorch_cpu -ltorch_python
file "$OBJ/_C.so" | grep -q "ARM aarch64" || { file "$OBJ/_C.so"; exit 1; }
# Every symbol it needs must be defined by a library it runs with (Python's own, Py*/_Py*, come from
# the interpreter that loads it).
SYSROOT=/usr/aarch64-linux-gnu/lib
aarch64-linux-gnu-nm -D --defined-only "$ARM_LIB"/lib*.so* \
  "$SYSROOT"/{libc.so.6,libm.so.6,libstdc++.so.6,libgcc_s.so.1,libgomp.so.1} \
  | awk 'NF == 3 { sub(/@.*/, "", $3); print $3 }' | sort -u > "$OBJ/defined.txt"
aarch64-linux-gnu-nm -D --undefined-only "$OBJ/_C.so" | awk '{ sub(/@.*/, "", $2); print $2 }' | sort -u \
  | grep -v -E '^_?Py|^__gmon_start__$|^_ITM_|^__cxa_finalize$' > "$OBJ/undefined.txt"
missing=$(comm -23 "$OBJ/undefined.txt" "$OBJ/defined.txt")
if [ -n "$missing" ]; then
  echo "the aarch64 _C.so needs symbols no library defines:"; echo "$missing" | head -20; exit 1
fi
# The generic (baseline) attention kernels are written with vector types: on aarch64 they must come
# out as NEON (fmla on v registers), not scalar code.
neon=$(aarch64-linux-gnu-objdump -d "$OBJ/csrc_cpu_attention_isa_baseline.cpp.o" | grep -c -E 'fmla\s+v' || true)
echo "aarch64 _C.so: $(wc -l < "$OBJ/undefined.txt") undefined symbols, all resolved;" \
  "baseline attention kernels: $neon NEON fmla instructions"
[ "$neon" -gt 100 ] || { echo "the aarch64 attention kernels are not vectorized"; exit 1; }

step "aarch64 under qemu-user: Debian's python$ARM_PY_VERSION runs info and check on that build (in the background)"
ROOT="$WORK/aarch64-root"
if [ ! -f "$ROOT/.done" ]; then
  rm -rf "$ROOT" "$WORK/aarch64-debs" && mkdir -p "$WORK/aarch64-debs"
  (cd "$WORK/aarch64-debs" && apt-get download -q \
    python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 libc6:arm64 \
    libstdc++6:arm64 libgcc-s1:arm64 libgomp1:arm64 zlib1g:arm64 libexpat1:arm64 libffi8:arm64 \
    libbz2-1.0:arm64 liblzma5:arm64 libssl3:arm64 libsqlite3-0:arm64 libuuid1:arm64 libcrypt1:arm64 \
    2> /dev/null > /dev/null)
  for deb in "$WORK"/aarch64-debs/*.deb; do dpkg -x "$deb" "$ROOT"; done
  touch "$ROOT/.done"
fi
PKG="$WORK/aarch64-package"
rm -rf "$PKG" && mkdir -p "$PKG"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard fused_attention | xargs -0 cp --parents -t "$PKG")
cp "$OBJ/_C.so" "$PKG/fused_attention/_C.so"
# info, then check, in one process: torch's import under qemu takes half a minute. It runs in the
# background beside the clang compiles below, on one thread (exec: $! is qemu itself, which the trap
# can stop).
(cd "$PKG" && exec qemu-aarch64 -L "$ROOT" -E PYTHONPATH="$PKG:$ARM_SITE" -E OMP_NUM_THREADS=1 \
  "$ROOT/usr/bin/python$ARM_PY_VERSION" -W ignore -c "import sys; from fused_attention.__main__ import main
main(['info']); print('--- check', flush=True); sys.exit(main(['check']))") > "$WORK/aarch64-info.txt" 2>&1 &
qemu_pid=$!
trap 'kill $qemu_pid 2> /dev/null || true' EXIT

step "clang++ -fsyntax-only: x86-64 and aarch64, torch $TORCH_VERSION"
ARM_HEADERS="$WORK/aarch64-headers-torch-$TORCH_VERSION"
if [ ! -f "$ARM_HEADERS/.done" ]; then
  python -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version "$PY_VERSION" "torch==$TORCH_VERSION" -d "$WORK/wheels"
  python - "$WORK/wheels/torch-$TORCH_VERSION-"*manylinux_2_28_aarch64.whl "$ARM_HEADERS" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    archive.extractall(dest, [name for name in archive.namelist() if name.startswith("torch/include/")])
EOF
  rm -rf "$WORK/wheels"
  touch "$ARM_HEADERS/.done"
fi
X86_FLAGS=$(flags "$HOST_TORCH/include" "$CXX11_ABI")
CLANG_ARM_FLAGS=$(flags "$ARM_HEADERS/torch/include" "$CXX11_ABI")
{ for source in $SOURCES; do echo "clang++ $X86_FLAGS -fsyntax-only $source"; done
  for source in $SOURCES; do echo "clang++ --target=aarch64-linux-gnu $CLANG_ARM_FLAGS -fsyntax-only $source"; done
} | xargs -P "$JOBS" -I{} sh -c '{} || exit 255'
step "all compiled; the aarch64 info and check (started at the qemu step):"
qemu_status=0
wait $qemu_pid || qemu_status=$?
trap - EXIT
cat "$WORK/aarch64-info.txt"
[ "$qemu_status" = 0 ] || { echo "aarch64: info or check exited with $qemu_status"; exit 1; }
grep -q "on aarch64 (Linux)" "$WORK/aarch64-info.txt"
grep -q "CPU attention kernels: baseline" "$WORK/aarch64-info.txt"
grep -E "^  cpu +available" "$WORK/aarch64-info.txt" > /dev/null || { echo "aarch64: the cpu backend is unavailable"; exit 1; }
grep -qE "^[0-9]+ checks: [0-9]+ passed, 0 failed" "$WORK/aarch64-info.txt" || { echo "aarch64: check failed"; exit 1; }
step "aarch64 checked"
