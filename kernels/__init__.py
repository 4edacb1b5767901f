"""Hand-written kernels on plain arrays (installed as ``tinydeeplab.kernels``).

One op per module; each states its index math once in its docstring and implements it for the
CPU (Numba) and for CUDA (numba.cuda).  No autograd here: arrays in, arrays out.

CPU kernels are compiled with ``parallel_njit`` below.  Which Numba threading layer runs them is
chosen in ``tinydeeplab._threads`` (oneTBB when OpenBLAS's workers sleep after each GEMM,
``workqueue`` otherwise): our kernels alternate Numba loops with BLAS calls
(im2col -> GEMM -> col2im), and on few cores two thread pools that busy-wait steal each other's
cores.  Calls from several Python threads are serialised by a lock (each call uses every core
anyway, and the ``workqueue`` layer cannot run two parallel kernels at once).
"""
import functools
import threading

import numba

from tinydeeplab import _threads

_threads.configure_numba()

_parallel_lock = threading.RLock()


def parallel_njit(fn, **options):
    """``numba.njit(parallel=True, cache=True, **options)(fn)``, callable from any Python
    thread."""
    compiled = numba.njit(parallel=True, cache=True, **options)(fn)

    @functools.wraps(fn)
    def call(*args):
        with _parallel_lock:
            return compiled(*args)

    call.compiled = compiled
    return call
