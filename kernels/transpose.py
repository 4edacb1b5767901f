"""out = scale · aᵀ for a 2-D array, in tiles (CPU).

The CRF keeps label scores as (C, N) at its interface (pydensecrf's layout) and (N, C) inside
(one pixel's C scores contiguous, as the lattice reads them).  NumPy's transposing copy walks
one of the two arrays with a stride of N elements, one cache miss per element; copying
32×32 tiles keeps both sides in cache, and the tiles are spread over the cores.
"""
import numpy as np
from numba import prange

from . import parallel_njit

TILE = 32


def _transpose(a, scale, out):
    R, C = a.shape
    tiles_c = (C + TILE - 1) // TILE
    for t in prange(((R + TILE - 1) // TILE) * tiles_c):
        r0, c0 = (t // tiles_c) * TILE, (t % tiles_c) * TILE
        for c in range(c0, min(C, c0 + TILE)):
            for r in range(r0, min(R, r0 + TILE)):
                out[c, r] = scale * a[r, c]


_transpose_cpu = parallel_njit(_transpose)


def transpose(a, scale=1.0):
    """scale · aᵀ as a new C-contiguous array (NumPy arrays, CPU)."""
    out = np.empty((a.shape[1], a.shape[0]), dtype=a.dtype)
    _transpose_cpu(a, a.dtype.type(scale), out)
    return out
