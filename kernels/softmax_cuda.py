"""CUDA version of ``softmax.softmax_rows``: one thread per row (rows are short: C labels)."""
import math

from ._cuda import cuda

from ._common import launch


@cuda.jit(device=True, inline=True)
def softmax_row(a, out, n):
    """Row n of out ← the softmax of row n of a (out may be a).  Also the last step of each
    iteration of the one-launch mean field (permutohedral.cuda_mean_field): the same bits."""
    C = a.shape[1]
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


@cuda.jit
def _softmax_rows_kernel(a, out):
    n = cuda.grid(1)
    if n < a.shape[0]:
        softmax_row(a, out, n)


def softmax_rows(a, out):
    launch(_softmax_rows_kernel, a.shape[0], a, out)
