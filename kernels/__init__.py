"""Hand-written kernels on plain arrays (installed as ``tinydeeplab.kernels``).

One op per module; each states its index math once in its docstring and implements it for the
CPU (Numba) and for CUDA (numba.cuda).  No autograd here: arrays in, arrays out.

CPU kernels are compiled with ``parallel_njit`` below.  It selects Numba's ``workqueue``
threading layer (unless the user chose one with NUMBA_THREADING_LAYER): the OpenMP layer's
workers busy-wait after every parallel loop, and since our kernels alternate Numba loops with
BLAS calls (im2col -> GEMM -> col2im), spinning workers stole the cores BLAS needed — 2x slower
convolutions on 2 cores, worse when PyTorch's OpenMP runtime was loaded first.  ``workqueue``
does not allow two threads to run parallel kernels at the same time, so calls are serialised by
a lock (each call uses every core anyway).
"""
import functools
import os
import threading

import numba

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

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
