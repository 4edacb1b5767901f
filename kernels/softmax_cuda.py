"""CUDA version of ``softmax.softmax_rows``: one thread per row (rows are short: C labels)."""
import math

from ._cuda import cuda

from ._common import launch


@cuda.jit
def _softmax_rows_kernel(a, out):
    n = cuda.grid(1)
    N, C = a.shape
    if n >= N:
        return
    m = a[n, 0]
    for k in range(1, C):
        m = max(m, a[n, k])
    total = 0.0
    for k in range(C):
        e = math.exp(a[n, k] - m)
        out[n, k] = e
        total += e
    for k in range(C):
        out[n, k] = out[n, k] / total


def softmax_rows(a, out):
    launch(_softmax_rows_kernel, a.shape[0], a, out)
