"""Triton kernels and their launchers (no autograd, no dispatch).

Importing this package never imports Triton; the kernel modules (``rotary``, ``sinusoidal``, ...) do,
so import them only after :func:`triton_unavailable_reason` returned None for the device at hand.

Triton fixes interpreter mode per kernel when ``@triton.jit`` runs, that is when a kernel module is
first imported, not when Triton is imported or a kernel is launched: ``TRITON_INTERPRET=1`` must be in
the environment before the kernel modules are imported for them to run on CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import types
from collections.abc import Iterator

import torch

# CUDA caps a launch grid's second and third axes at this many programs (the first at 2**31 - 1): launchers
# that put the batch there launch it in slices of at most this many.
GRID_YZ_MAX = 65535


def batch_slices(batch: int, *tensors: torch.Tensor) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
    """(entries, the tensors' views of them) for each slice of the batch (dim 0) that a grid's second or
    third axis can hold (GRID_YZ_MAX): the tensors themselves when the whole batch fits (no views made on a
    call's every launch)."""
    if batch <= GRID_YZ_MAX:
        yield batch, tensors
        return
    for start in range(0, batch, GRID_YZ_MAX):
        part = slice(start, min(batch, start + GRID_YZ_MAX))
        yield part.stop - part.start, tuple(t[part] for t in tensors)


@functools.cache
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name == "triton":
            return "triton is not installed"
        if error.name == "numpy":  # under TRITON_INTERPRET=1 even `import triton` runs the interpreter
            return "triton cannot be imported: the Triton interpreter (TRITON_INTERPRET=1) needs numpy"
        return f"triton cannot be imported ({error})"
    except (ImportError, OSError, RuntimeError) as error:  # a broken install: unavailable, not a crash
        return f"triton cannot be imported ({type(error).__name__}: {error})"
    return None


def _interpreting_now() -> bool:
    """Whether ``@triton.jit`` would make interpreted kernels now."""
    import triton

    knobs = getattr(triton, "knobs", None)  # Triton 3.4+; older releases read the variable in @jit
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # exactly Triton 3.2/3.3's own test


def _defined_kernel_modes() -> set[bool]:
    """Interpreter mode (True: interpreted) of every kernel in the kernel modules imported so far."""
    from triton.runtime.jit import JITFunction

    # Not imported here: triton.runtime.interpreter needs numpy, which neither torch nor Triton installs.
    # An interpreted kernel exists only once @triton.jit has imported that module itself.
    interpreter = sys.modules.get("triton.runtime.interpreter")
    interpreted = getattr(interpreter, "InterpretedFunction", ())
    modes = set()
    for module in vars(sys.modules[__name__]).values():
        if isinstance(module, types.ModuleType) and module.__name__.startswith(__name__ + "."):
            for obj in vars(module).values():
                if isinstance(obj, interpreted):
                    modes.add(True)
                elif isinstance(obj, JITFunction):
                    modes.add(False)
    return modes


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on tensors of ``device``, or None when they can.

    They can when Triton imports and the device is CUDA, or the device is the CPU and the kernels run
    under the Triton interpreter (``TRITON_INTERPRET=1`` set before the kernel modules were imported).
    """
    error = _import_error()
    if error is not None:
        return error
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"device {device.type} is not supported (triton runs on cuda, and on cpu under TRITON_INTERPRET=1)"
    modes = _defined_kernel_modes()
    if False in modes:
        return (
            "CPU tensors need the Triton interpreter, but the triton kernels were imported without "
            "TRITON_INTERPRET=1 (set it before importing them)"
        )
    if not modes and not _interpreting_now():
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    if not modes and _numpy_missing():
        return "CPU tensors need the Triton interpreter, which needs numpy (not installed)"
    return None


@functools.cache
def _numpy_missing() -> bool:
    return importlib.util.find_spec("numpy") is None


@contextlib.contextmanager
def device_guard(tensor: torch.Tensor) -> Iterator[None]:
    """Makes ``tensor``'s CUDA device current while launching (Triton launches on the current device)."""
    if tensor.is_cuda:
        with torch.cuda.device(tensor.device):
            yield
    else:
        yield
