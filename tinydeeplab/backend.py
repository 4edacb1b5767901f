"""Which array library holds an array, and whether a GPU is there.

Library code never asks "am I on the GPU?" directly; it asks ``array_module(a)`` for the module
(``numpy`` or ``cupy``) that owns ``a`` and calls that.  CuPy is optional: nothing here imports it
unless a CuPy array is actually handed to us or the user asks for the ``"cuda"`` device.
"""
import contextlib
import functools
import os

import numpy as np


def is_cupy_array(a):
    """True for a ``cupy.ndarray`` (checked without importing CuPy)."""
    return type(a).__module__.split(".")[0] == "cupy"


def array_module(a):
    """``cupy`` for CuPy arrays, ``numpy`` for everything else (arrays, scalars, lists)."""
    if is_cupy_array(a):
        import cupy

        return cupy
    return np


@functools.lru_cache(maxsize=None)
def has_cuda():
    """True when CuPy is installed and sees at least one CUDA device.

    Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) there is no real device, so this
    is False there even though ``numba.cuda.is_available()`` says True.
    """
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # not installed, no driver, no device: all mean "no GPU"
        return False


def cuda_simulator():
    """True when Numba's CUDA simulator is switched on for this process."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


# ---- the simulated GPU: the CUDA path run on NumPy arrays (tests without a GPU) -------------
_simulated_gpu = False


@contextlib.contextmanager
def simulated_gpu():
    """Inside this block NumPy arrays count as "cuda" arrays: every kernel dispatches to its
    CUDA implementation, which Numba's simulator runs on the CPU, and ``Tensor.to("cuda")``
    and ``Module.to("cuda")`` keep the arrays where they are.  So a whole training step runs
    the CUDA path and can be compared with the CPU path on the same arrays.  Needs
    ``NUMBA_ENABLE_CUDASIM=1`` (set before numba is imported, i.e. before tinydeeplab is);
    simulated kernels are slow, so keep the shapes tiny."""
    global _simulated_gpu
    if not cuda_simulator():
        raise RuntimeError("simulated_gpu() needs Numba's CUDA simulator: set "
                           "NUMBA_ENABLE_CUDASIM=1 before importing tinydeeplab")
    if has_cuda():
        raise RuntimeError("simulated_gpu() is for machines without a GPU; with CuPy and a GPU "
                           "use real CuPy arrays (Tensor.to('cuda'))")
    before, _simulated_gpu = _simulated_gpu, True
    try:
        yield
    finally:
        _simulated_gpu = before


def cuda_usable():
    """True when ``device="cuda"`` can run: CuPy sees a GPU, or inside ``simulated_gpu()``."""
    return _simulated_gpu or has_cuda()


def on_gpu(a):
    """True when ``a``'s kernels run on CUDA: a CuPy array, or any NumPy array inside
    ``simulated_gpu()``.  Kernel dispatch asks this; moving data (``.get()``) asks
    ``is_cupy_array``."""
    return is_cupy_array(a) or (_simulated_gpu and isinstance(a, np.ndarray))


def device_of(a):
    return "cuda" if on_gpu(a) else "cpu"


def to_device(a, device):
    """Copy array ``a`` to ``device`` ("cpu" or "cuda"); no copy when it is already there."""
    if device == "cpu":
        return a.get() if is_cupy_array(a) else np.asarray(a)
    if device == "cuda":
        if _simulated_gpu:
            return np.asarray(a)
        if not has_cuda():
            raise RuntimeError(
                "device='cuda' was requested but no CUDA GPU is usable: install the extra "
                "with `pip install tinydeeplab[cuda]` (CuPy for CUDA 12) on a machine with an "
                "NVIDIA GPU"
            )
        import cupy

        return cupy.asarray(a)
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
