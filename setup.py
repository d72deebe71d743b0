"""Builds the compiled extension ``fused_attention._C``.

The C++ (CPU) kernels are always built. The CUDA kernels are built whenever torch is a CUDA build and
nvcc is found; no GPU is needed to compile them. Environment variables:

- ``TORCH_CUDA_ARCH_LIST``: GPU architectures to compile for (default ``8.0;9.0+PTX``).
- ``MAX_JOBS``: parallel compile jobs (read by torch's ``BuildExtension``).
- ``FUSED_ATTENTION_SKIP_CUDA_BUILD=1``: build the C++ kernels only.
- ``FUSED_ATTENTION_FORCE_CUDA_BUILD=1``: fail instead of falling back to C++ only when CUDA can't be built.
- ``FUSED_ATTENTION_FORCE_CPP_BUILD=1``: fail instead of installing without the extension when the C++
  kernels can't be built.

A native build that fails never fails the install (unless forced as above): a CUDA compile error falls
back to the C++ kernels only, a C++ one to no extension at all (the ``triton`` and ``torch`` backends
still work). Either prints a warning, and the reason is installed beside the package
(``fused_attention/_C_build_failure.txt``), where ``python -m fused_attention info`` reports it.

Install with ``pip install --no-build-isolation .`` (or ``-e .``).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _is_cuda_toolkit(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def _locate_cuda_home() -> None:
    # torch takes the parent of the `nvcc` on PATH as CUDA_HOME; when that nvcc is a wrapper script
    # (e.g. /usr/local/bin/nvcc) the guess has no lib64/ and linking fails with "cannot find -lcudart".
    # Settle CUDA_HOME before torch.utils.cpp_extension reads it at import.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for candidate in [*candidates, "/usr/local/cuda"]:
        if _is_cuda_toolkit(candidate):
            os.environ["CUDA_HOME"] = candidate
            return


_locate_cuda_home()

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:
    raise SystemExit(
        "fused_attention: install torch first; the build needs the torch you run with, hence "
        f"`pip install --no-build-isolation .` ({exc})"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools rejects absolute source paths in some versions.
    return sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(CSRC, pattern)))


def _cuda_build_problems() -> list[str]:
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or not _is_cuda_toolkit(cuda_home):
        problems.append(f"no CUDA toolkit with nvcc found (CUDA_HOME={cuda_home}); set CUDA_HOME")
    return problems


def _build_cuda() -> bool:
    skip = _env_flag("FUSED_ATTENTION_SKIP_CUDA_BUILD")
    force = _env_flag("FUSED_ATTENTION_FORCE_CUDA_BUILD")
    if skip and force:
        raise SystemExit("fused_attention: set at most one of FUSED_ATTENTION_SKIP/FORCE_CUDA_BUILD")
    if skip:
        print(
            "fused_attention: FUSED_ATTENTION_SKIP_CUDA_BUILD set; building C++ kernels only", file=sys.stderr
        )
        return False
    # A GPU is never required to compile, so "force" only turns a silent fallback into an error.
    problems = _cuda_build_problems()
    if problems and force:
        raise SystemExit("fused_attention: FUSED_ATTENTION_FORCE_CUDA_BUILD=1 but " + "; ".join(problems))
    if problems:
        print("fused_attention: building C++ kernels only: " + "; ".join(problems), file=sys.stderr)
        return False
    return True


CUDA_DEFINE = "-DFUSED_ATTENTION_WITH_CUDA"
# Written next to the extension when it could not be built; read by fused_attention/_extension.py.
BUILD_FAILURE_NOTE = "_C_build_failure.txt"


def _extension():
    with_cuda = _build_cuda()
    # No -std flag: BuildExtension adds the standard this torch's headers expect (C++20 for recent
    # torch, C++17 for older); pinning one here would break one end of torch>=2.6. The sources are C++17.
    # -ffp-contract=fast: ISO -std modes default to off, which splits every a * b + c of the kernels'
    # vector code into a multiply and an add (half the FMA throughput, and one more rounding).
    cxx_flags = ["-O3", "-ffp-contract=fast"]
    link_flags = []
    # at::parallel_for expands an `omp parallel` region inline in our code: without -fopenmp it runs on
    # one thread. Linking libgomp.so.1 reuses the copy torch already loaded.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    sources = _sources("*.cpp") + _sources(os.path.join("cpu", "*.cpp"))
    if not with_cuda:
        return cpp_extension.CppExtension(
            "fused_attention._C",
            sources,
            include_dirs=[CSRC],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    # Without a list torch targets the visible GPU or, with none, every architecture it knows (slow).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    define = CUDA_DEFINE
    return cpp_extension.CUDAExtension(
        "fused_attention._C",
        sources + _sources(os.path.join("cuda", "*.cu")),
        include_dirs=[CSRC],
        extra_compile_args={"cxx": [*cxx_flags, define], "nvcc": ["-O3", define]},
        extra_link_args=link_flags,
    )


def _warn(message: str) -> None:
    bar = "=" * 100
    print(f"\n{bar}\nfused_attention WARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class OptionalBuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, except that a failed native build does not fail the install.

    A failed CUDA build is retried with the C++ kernels only (unless FUSED_ATTENTION_FORCE_CUDA_BUILD);
    a failed C++ build leaves the package without ``fused_attention._C`` (unless
    FUSED_ATTENTION_FORCE_CPP_BUILD) and records why in BUILD_FAILURE_NOTE beside where it would be.
    """

    def build_extensions(self) -> None:
        (ext,) = self.extensions
        note = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_FAILURE_NOTE)
        if os.path.exists(note):
            os.remove(note)
        try:
            super().build_extensions()
            return
        except Exception as error:  # noqa: BLE001 - compiler errors surface as several exception types
            failure = error
        if CUDA_DEFINE in ext.extra_compile_args.get("cxx", []) and not _env_flag(
            "FUSED_ATTENTION_FORCE_CUDA_BUILD"
        ):
            _warn(f"the CUDA kernels failed to build ({_first_line(failure)}); building the C++ kernels only")
            _drop_cuda(ext)
            try:
                super().build_extensions()
                return
            except Exception as error:  # noqa: BLE001
                failure = error
        if _env_flag("FUSED_ATTENTION_FORCE_CPP_BUILD") or _env_flag("FUSED_ATTENTION_FORCE_CUDA_BUILD"):
            raise failure
        reason = (
            f"the compiled extension fused_attention._C could not be built ({_first_line(failure)}), so "
            "the 'cpu' and 'cuda' backends are unavailable (the 'torch' backend, and 'triton' on a GPU, "
            "work). Rebuild with FUSED_ATTENTION_FORCE_CPP_BUILD=1 and pip's -v to see the compiler's error."
        )
        _warn(reason + " Installing the Python package without it.")
        stale = self.get_ext_fullpath(ext.name)
        if os.path.exists(stale):  # an older build's library would load in place of the failed one
            os.remove(stale)
        os.makedirs(os.path.dirname(note), exist_ok=True)
        with open(note, "w") as file:
            file.write(reason + "\n")


def _drop_cuda(ext) -> None:
    # Keeps the flags torch's BuildExtension already added (C++ standard, ABI, extension name).
    ext.sources = [source for source in ext.sources if not source.endswith(".cu")]
    ext.extra_compile_args = {"cxx": [flag for flag in ext.extra_compile_args["cxx"] if flag != CUDA_DEFINE]}


setup(
    packages=find_packages(include=["fused_attention", "fused_attention.*"]),
    package_data={"fused_attention": ["py.typed"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": OptionalBuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
