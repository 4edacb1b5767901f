"""Softmax over the last axis of a 2-D array, in one fused pass.

    out[n, k] = exp(a[n, k] − max_k a[n, :]) / Σ_k exp(a[n, k] − max_k a[n, :])

Subtracting the row maximum keeps exp from overflowing and does not change the result.  The
CRF's mean-field loop normalises (N, C) log-potentials every iteration; one pass over the rows
(CPU: a Numba loop per row; CUDA, in softmax_cuda.py: one thread per row) replaces five array
operations and their temporaries.
"""
import math

from numba import prange

from tinydeeplab.backend import is_cupy_array

from . import parallel_njit


def _softmax_rows(a, out):
    N, C = a.shape
    for n in prange(N):
        m = a[n, 0]
        for k in range(1, C):
            m = max(m, a[n, k])
        total = 0.0
        for k in range(C):
            e = math.exp(a[n, k] - m)
            out[n, k] = e
            total += e
        inv = 1.0 / total
        for k in range(C):
            out[n, k] *= inv


_softmax_rows_cpu = parallel_njit(_softmax_rows)


def softmax_rows(a, out, cuda=None):
    """out = row-wise softmax of the 2-D float array a (NumPy → CPU, CuPy → CUDA;
    ``cuda=True`` runs the CUDA kernel on NumPy arrays under the simulator)."""
    if cuda or (cuda is None and is_cupy_array(a)):
        from . import softmax_cuda

        softmax_cuda.softmax_rows(a, out)
    else:
        _softmax_rows_cpu(a, out)
    return out
