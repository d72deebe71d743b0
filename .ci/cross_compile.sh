#!/usr/bin/env bash
# Compiles every C++ source of csrc/ the way users on other platforms would, without their machines:
#   aarch64: Debian's aarch64-linux-gnu-g++ against the aarch64 torch wheel's headers, object files with
#            setup.py's flags, then a shared library linked against that wheel's libraries whose every
#            undefined symbol must be found in torch, the C/C++/OpenMP runtimes or Python;
#   clang:   clang++ -fsyntax-only, for x86-64 (host torch) and for aarch64 (macOS-like: clang on ARM),
#            to catch GCC-only code.
# Usage: .ci/cross_compile.sh WORKDIR (needs the venv's python with torch, and the apt packages below).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${1:?usage: $0 WORKDIR}
JOBS=${MAX_JOBS:-2}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

read -r TORCH_VERSION PY_VERSION CXX11_ABI HOST_TORCH PY_INCLUDE < <(python - <<'EOF'
import os, sys, sysconfig
import torch
print(torch.__version__.split("+")[0], f"{sys.version_info[0]}.{sys.version_info[1]}",
      int(torch._C._GLIBCXX_USE_CXX11_ABI), os.path.dirname(torch.__file__), sysconfig.get_paths()["include"])
EOF
)

# The aarch64 wheel of the same torch: its headers and the libraries to link against.
ARM_TORCH="$WORK/torch-aarch64-$TORCH_VERSION"
if [ ! -f "$ARM_TORCH/.done" ]; then
  python -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version "$PY_VERSION" "torch==$TORCH_VERSION" -d "$WORK/wheels"
  python - "$WORK/wheels/torch-$TORCH_VERSION-"*manylinux_2_28_aarch64.whl "$ARM_TORCH" <<'EOF'
import re, sys, zipfile
wheel, dest = sys.argv[1:]
keep = re.compile(r"torch/(include/.*|lib/lib(c10|torch|torch_cpu|torch_python|gomp)\.so(\.\d+)*)$")
with zipfile.ZipFile(wheel) as archive:
    archive.extractall(dest, [name for name in archive.namelist() if keep.match(name)])
EOF
  touch "$ARM_TORCH/.done"
fi

SOURCES=$(ls csrc/*.cpp csrc/cpu/*.cpp)
# setup.py's C++ flags plus what torch's BuildExtension adds (the standard torch's headers need, the ABI).
# The host's Python headers stand in for aarch64's: both are LP64 Linux, and pybind11 only needs the API.
common_flags() {  # $1: torch include root
  echo "-std=c++20 -fPIC -fopenmp -O3 -ffp-contract=fast -Icsrc -isystem $1 -isystem $1/torch/csrc/api/include" \
    "-isystem $PY_INCLUDE -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C" \
    "-D_GLIBCXX_USE_CXX11_ABI=$CXX11_ABI"
}

echo "aarch64-linux-gnu-g++: object files against torch $TORCH_VERSION (aarch64 wheel)"
OBJ="$WORK/aarch64-objects"
rm -rf "$OBJ" && mkdir -p "$OBJ"
ARM_FLAGS=$(common_flags "$ARM_TORCH/torch/include")
export ARM_FLAGS OBJ
echo "$SOURCES" | xargs -P "$JOBS" -I{} sh -c \
  'aarch64-linux-gnu-g++ $ARM_FLAGS -c {} -o "$OBJ/$(echo {} | tr / _).o" || exit 255'

LIB="$ARM_TORCH/torch/lib"
aarch64-linux-gnu-g++ -shared -fopenmp -o "$OBJ/_C.so" "$OBJ"/*.o -L"$LIB" -Wl,-rpath-link,"$LIB" \
  -lc10 -ltorch -ltorch_cpu -ltorch_python
file "$OBJ/_C.so" | grep -q "ARM aarch64" || { file "$OBJ/_C.so"; exit 1; }
# Every symbol the library needs must be defined by a library it will run with (Python's own, Py*/_Py*,
# come from the interpreter that loads it).
SYSROOT=/usr/aarch64-linux-gnu/lib
aarch64-linux-gnu-nm -D --defined-only "$LIB"/lib*.so* "$SYSROOT"/{libc.so.6,libm.so.6,libstdc++.so.6,libgcc_s.so.1} \
  | awk 'NF == 3 { sub(/@.*/, "", $3); print $3 }' | sort -u > "$OBJ/defined.txt"
aarch64-linux-gnu-nm -D --undefined-only "$OBJ/_C.so" | awk '{ sub(/@.*/, "", $2); print $2 }' | sort -u \
  | grep -v -E '^_?Py|^__gmon_start__$|^_ITM_|^__cxa_finalize$' > "$OBJ/undefined.txt"
missing=$(comm -23 "$OBJ/undefined.txt" "$OBJ/defined.txt")
if [ -n "$missing" ]; then
  echo "aarch64 _C.so needs symbols no library defines:"; echo "$missing" | head -20; exit 1
fi
# The generic (baseline) attention kernels are written with vector types: on aarch64 they must come
# out as NEON (fmla on v registers), not scalar code.
neon=$(aarch64-linux-gnu-objdump -d "$OBJ/csrc_cpu_attention_isa_baseline.cpp.o" | grep -c -E 'fmla\s+v' || true)
echo "aarch64 _C.so links ($(wc -l < "$OBJ/undefined.txt") undefined symbols, all resolved);" \
  "baseline attention kernels: $neon NEON fmla instructions"
[ "$neon" -gt 100 ] || { echo "the aarch64 attention kernels are not vectorized"; exit 1; }

echo "clang++ -fsyntax-only: x86-64 (torch $TORCH_VERSION) and aarch64"
X86_FLAGS=$(common_flags "$HOST_TORCH/include")
export X86_FLAGS
{ for source in $SOURCES; do echo "clang++ $X86_FLAGS -fsyntax-only $source"; done
  for source in $SOURCES; do echo "clang++ --target=aarch64-linux-gnu $ARM_FLAGS -fsyntax-only $source"; done
} | xargs -P "$JOBS" -I{} sh -c '{} || exit 255'
echo "clang: all sources compile"
