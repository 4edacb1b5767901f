"""Test setup: CUDA kernels run on a real GPU when CuPy sees one, else on Numba's simulator.

The simulator has to be chosen before ``numba.cuda`` is first imported, which is why this is
decided here, at collection time, before any test module is imported.  tinydeeplab itself only
imports numba.cuda when a CUDA kernel is first used.
"""
import os
import sys

# tinydeeplab before NumPy, as its users import it: it has OpenBLAS's workers sleep after each
# GEMM and picks Numba's TBB layer (tinydeeplab/_threads.py).  With NumPy first the suite runs
# on the workqueue layer, whose ~50 µs wake per parallel loop made the small kernels' tests
# (the CRF layer's gradcheck: ~800 forwards) an order of magnitude slower.
from tinydeeplab import _threads  # noqa: E402  (numba.cuda is not imported yet: see below)


def _gpu_visible():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


CUDA_MODE = "gpu" if _gpu_visible() else "simulator"
if CUDA_MODE == "simulator":
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba.cuda" in sys.modules:
        raise RuntimeError("numba.cuda was imported before tests/conftest.py could switch on the "
                           "CUDA simulator; run pytest from the project root")
    if "numba" in sys.modules:  # numba reads its environment once, at import: read it again
        import numba.core.config

        numba.core.config.reload_config()
        _threads.configure_numba()  # the reload set Numba's threading layer back to its default

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    # tiny test grids are expected to under-use a GPU.  numba-cuda 0.30 warns with a class of
    # its own (not numba.core's), its message starting with terminal highlighting: match the text
    config.addinivalue_line(
        "filterwarnings", "ignore:.*will likely result in GPU under-utilization")


def pytest_report_header(config):
    if CUDA_MODE == "gpu":
        return "tinydeeplab: CUDA kernels run on the GPU (CuPy sees a device)"
    return ("tinydeeplab: no GPU visible to CuPy: CUDA kernels run under Numba's CUDA simulator "
            "(NUMBA_ENABLE_CUDASIM=1) on tiny shapes")


def on_device(a, device):
    """Move a NumPy array where a kernel for ``device`` wants it ("cpu" or "cuda").

    Under the simulator the CUDA kernels take NumPy arrays, so "cuda" leaves them on the host.
    """
    if device == "cuda" and CUDA_MODE == "gpu":
        import cupy

        return cupy.asarray(a)
    return a


def to_numpy(a):
    return a.get() if type(a).__module__.startswith("cupy") else np.asarray(a)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)

# Tests compare training runs bit for bit (resumed against uninterrupted, one batch size against
# another).  The thread counts must not follow whatever else the test machine is running
# (tinydeeplab._threads.LoadAdapter; tests/test_threads.py tests it on its own).
os.environ.setdefault("TDL_ADAPT_THREADS", "0")
