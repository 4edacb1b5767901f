"""A batch of GEMMs shared out between threads, BLAS running on one thread in each (CPU).

The Winograd rungs multiply 16 or 36 pairs of matrices per pass: M[e] = V[e] · U[e]ᵀ, with a
few hundred tiles and 64-512 channels — 10-60 million multiply-adds each.  ``np.matmul`` hands
them to OpenBLAS one at a time, and OpenBLAS splits each one between its threads: a wake-up
and a wait at the end for every GEMM, and for the weight gradients' shape (a small K × C result
summed over a long tile axis) a split that leaves one thread idle part of the time.  Giving
each thread a contiguous share of the batch instead, with OpenBLAS on one thread inside each,
costs one hand-off per batch.  Measured on 2 cores (machine C, Zen 4, OpenBLAS SkylakeX): the
forward's GEMMs 0.9-0.95 of the time (~1.0 at 512 channels), the weight gradient's 0.7-0.95;
whole layers 0.8-0.97 (benchmarks/bench_conv_rules.py, section 4; docs/optimisation-notes.md).

Results are those of OpenBLAS on one thread for every GEMM, whatever the number of threads —
and so the same whether the machine is shared or not (``_threads.LoadAdapter``).  OpenBLAS's
thread count is one number for the whole process: while a batch runs it is 1, then it is put
back; a lock keeps two batches from doing that at once.  ``SPLIT = False`` turns it off (every
GEMM through ``np.matmul`` as before; the benchmark times both).
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tinydeeplab._threads import usable_cores

SPLIT = True
_CORES = usable_cores()

_lock = threading.Lock()
_blas = None  # threadpoolctl's controller of NumPy's BLAS, or False where there is none
_pool, _pool_size = None, 0


def _blas_controller():
    """NumPy's BLAS, as threadpoolctl controls it: the one loaded, or of several (SciPy's
    wheels bring their own OpenBLAS) the one in NumPy's wheel (``numpy.libs``); else False."""
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController

            libs = ThreadpoolController().select(user_api="blas").lib_controllers
        except Exception:  # noqa: BLE001  no controllable BLAS: plain np.matmul
            libs = []
        numpys = [lib for lib in libs
                  if "numpy" in os.path.basename(os.path.dirname(lib.filepath or ""))]
        _blas = libs[0] if len(libs) == 1 else numpys[0] if len(numpys) == 1 else False
    return _blas


def _workers(n):
    """A pool of n threads, kept between calls."""
    global _pool, _pool_size
    if _pool is None or _pool_size < n:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(n, thread_name_prefix="tinydeeplab-gemm")
        _pool_size = n
    return _pool


def _after_fork_in_child():
    # a forked child has none of the parent's threads, and a lock held by one of them at the
    # fork would stay held: start both afresh
    global _lock, _pool, _pool_size
    _lock, _pool, _pool_size = threading.Lock(), None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def matmul_batch(a, b, out):
    """``np.matmul(a, b, out=out)`` for 3-D a, b, out (out[e] = a[e] @ b[e]): the batch cut
    into one contiguous share per BLAS thread, each share's GEMMs run by BLAS on one thread."""
    blas = _blas_controller() if SPLIT else False
    if not blas:
        return np.matmul(a, b, out=out)
    with _lock:
        threads = blas.get_num_threads()
        shares = min(threads, _CORES, a.shape[0])  # never more threads than cores
        if shares < 2:
            return np.matmul(a, b, out=out)
        cut = [a.shape[0] * i // shares for i in range(shares + 1)]
        pool = _workers(shares - 1)
        blas.set_num_threads(1)
        try:
            rest = [pool.submit(np.matmul, a[s:e], b[s:e], out=out[s:e])
                    for s, e in zip(cut[1:-1], cut[2:])]
            np.matmul(a[:cut[1]], b[:cut[1]], out=out[:cut[1]])
            for share in rest:
                share.result()
        finally:
            blas.set_num_threads(threads)
    return out
