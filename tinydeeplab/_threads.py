"""How tinydeeplab's CPU thread pools share a few cores (imported first, before NumPy).

A training step alternates two kinds of parallel work a few hundred times: Numba loops (im2col,
batch norm, pooling) and OpenBLAS GEMMs.  Each library keeps its own worker threads, and what a
worker does when its job ends decides whether the *other* library gets the cores:

* OpenBLAS workers spin (polling for the next GEMM, calling sched_yield) for 2^28 CPU cycles —
  about 0.1 s — before they sleep.  A Numba loop started in that window shares the cores with
  spinning threads.
* Numba's ``omp`` layer (GNU OpenMP) spins after each loop too (GOMP_SPINCOUNT, 300 000 polls by
  default), and then the next GEMM runs beside it.  Its ``workqueue`` layer never spins, but
  waking its workers costs ~50 µs per parallel loop (GNU OpenMP: ~3 µs).

Measured on 2 cores (benchmarks/RESULTS.md), one tiny-DeepLab training step: workqueue with
spinning OpenBLAS ~0.15 s; omp with spinning OpenBLAS ~0.19 s; omp, short OpenMP spin and
OpenBLAS workers that sleep at once ~0.125 s.  So, unless you chose otherwise:

1. before NumPy (and so OpenBLAS) is first imported, set ``OPENBLAS_THREAD_TIMEOUT=4``
   (2^4 cycles: its workers go to sleep right after a GEMM); the variable is removed again once
   NumPy has loaded, so child processes and other libraries see your environment unchanged;
2. if that worked (or you set OPENBLAS_THREAD_TIMEOUT yourself), use Numba's ``omp`` layer with
   ``GOMP_SPINCOUNT=10000`` (set only while Numba loads its OpenMP runtime, so PyTorch's own
   OpenMP keeps its defaults); otherwise keep ``workqueue``.

Your own NUMBA_THREADING_LAYER, OPENBLAS_THREAD_TIMEOUT, GOMP_SPINCOUNT or OMP_WAIT_POLICY win.
``describe()`` says what was chosen (the benchmarks print it).
"""
import os
import sys

_USER_SET_TIMEOUT = "OPENBLAS_THREAD_TIMEOUT" in os.environ
_NUMPY_WAS_LOADED = "numpy" in sys.modules
BLAS_WORKERS_SLEEP = _USER_SET_TIMEOUT or not _NUMPY_WAS_LOADED
if not _NUMPY_WAS_LOADED and not _USER_SET_TIMEOUT:
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
    try:
        import numpy  # noqa: F401  loads OpenBLAS, which reads the variable now
    finally:
        del os.environ["OPENBLAS_THREAD_TIMEOUT"]

_choice = "your NUMBA_THREADING_LAYER"


def configure_numba():
    """Pick Numba's threading layer (called by tinydeeplab.kernels before any kernel runs)."""
    global _choice
    import numba

    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    if not BLAS_WORKERS_SLEEP:
        numba.config.THREADING_LAYER = "workqueue"
        _choice = "workqueue (NumPy was imported before tinydeeplab: OpenBLAS workers spin)"
        return
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
    numba.config.THREADING_LAYER = "default"  # the first of the priority list that loads
    set_spin = not ({"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ))
    if set_spin:
        os.environ["GOMP_SPINCOUNT"] = "10000"
    try:  # load the layer (and its OpenMP runtime) now, while the variable is set
        from numba.np.ufunc.parallel import _launch_threads

        _launch_threads()
    except Exception:  # noqa: BLE001  no layer could load: Numba reports it at the first kernel
        pass
    finally:
        if set_spin:
            del os.environ["GOMP_SPINCOUNT"]
    _choice = "default order omp > workqueue" + (", GOMP_SPINCOUNT=10000" if set_spin else "")


def describe():
    """One line for benchmark headers: the Numba layer in use and how OpenBLAS waits."""
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = "not loaded yet"
    blas = ("OPENBLAS_THREAD_TIMEOUT=" + os.environ["OPENBLAS_THREAD_TIMEOUT"]
            if _USER_SET_TIMEOUT else "OpenBLAS workers sleep after each call (timeout 2^4)"
            if BLAS_WORKERS_SLEEP else "OpenBLAS workers spin (NumPy imported first)")
    return f"Numba threading layer {layer} ({_choice}); {blas}"
