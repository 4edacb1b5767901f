"""Bilinear resizing of NCHW arrays, forward and backward, matching ``torch.nn.functional.
interpolate(mode="bilinear")`` with ``align_corners`` False and True.

Each output row i reads the input at the real coordinate

    align_corners=True:   src(i) = i · (H − 1) / (Ho − 1)               (corners meet corners)
    align_corners=False:  src(i) = max(0, (i + ½) · H / Ho − ½)        (pixel centres meet)

and blends its two neighbouring rows i0 = ⌊src⌋, i1 = min(i0 + 1, H − 1) with weights
1 − λ and λ, λ = src − i0; columns likewise.  So y = A_h · x · A_wᵀ per plane, where A_h
(Ho × H) has two non-zeros per row, and the backward is dx = A_hᵀ · dy · A_w.

The 1-D tables (i0, i1, weights) are computed once per call on the host in the input's dtype,
as PyTorch does.  For the backward every input element *gathers* the output rows and columns
that used it (the transposed tables, in CSR form), so neither the CPU (parallel over planes)
nor the CUDA kernel (one thread per input element) needs atomics.

Variants: ``cpu_v1`` (Numba), ``cuda_v1`` (numba.cuda).
"""
from collections import namedtuple

import numpy as np
from numba import prange

from tinydeeplab.backend import array_module

from . import parallel_njit
from ._common import lazy, pick

Variant = namedtuple("Variant", "device forward backward description")


def axis_table(n_in, n_out, align_corners, dtype):
    """Forward table (i0, i1, w0, w1) of length n_out, and its transpose in CSR form:
    for input index h, entries starts[h]:starts[h+1] of (rows, weights)."""
    dtype = np.dtype(dtype).type
    i = np.arange(n_out).astype(dtype)
    if align_corners:
        scale = dtype((n_in - 1) / (n_out - 1)) if n_out > 1 else dtype(0)
        src = scale * i
    else:
        scale = dtype(n_in) / dtype(n_out)
        src = np.maximum(scale * (i + dtype(0.5)) - dtype(0.5), dtype(0))
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    lam = (src - i0.astype(dtype)).astype(dtype)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0).astype(np.int32)
    w0, w1 = (dtype(1) - lam).astype(dtype), lam
    src_index = np.concatenate([i0, i1])
    order = np.argsort(src_index, kind="stable")
    rows = np.concatenate([np.arange(n_out), np.arange(n_out)])[order].astype(np.int32)
    weights = np.concatenate([w0, w1])[order]
    starts = np.searchsorted(src_index[order], np.arange(n_in + 1)).astype(np.int32)
    return (i0, i1, w0, w1), (starts, rows, weights)


def _forward(x, y, h0, h1, hw0, hw1, v0, v1, vw0, vw1):
    N, C = x.shape[0], x.shape[1]
    Ho, Wo = y.shape[2], y.shape[3]
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for i in range(Ho):
            a, b = h0[i], h1[i]
            for j in range(Wo):
                p, q = v0[j], v1[j]
                y[n, c, i, j] = (hw0[i] * (vw0[j] * x[n, c, a, p] + vw1[j] * x[n, c, a, q])
                                 + hw1[i] * (vw0[j] * x[n, c, b, p] + vw1[j] * x[n, c, b, q]))


def _backward(dy, dx, hs, hr, hw, vs, vr, vw):
    N, C, H, W = dx.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for h in range(H):
            for v in range(W):
                acc = 0.0
                for e in range(hs[h], hs[h + 1]):
                    row = 0.0
                    for f in range(vs[v], vs[v + 1]):
                        row += vw[f] * dy[n, c, hr[e], vr[f]]
                    acc += hw[e] * row
                dx[n, c, h, v] = acc


_forward_cpu = parallel_njit(_forward)
_backward_cpu = parallel_njit(_backward)


def _tables(shape_in, shape_out, align_corners, dtype, xp):
    (H, W), (Ho, Wo) = shape_in, shape_out
    rows = axis_table(H, Ho, align_corners, dtype)
    cols = axis_table(W, Wo, align_corners, dtype)
    return [[xp.asarray(a) for a in part] for part in (*rows, *cols)]


def _cpu_forward(x, size, align_corners):
    fh, _, fw, _ = _tables(x.shape[2:], size, align_corners, x.dtype, np)
    y = np.empty(x.shape[:2] + tuple(size), dtype=x.dtype)
    _forward_cpu(x, y, *fh, *fw)
    return y


def _cpu_backward(dy, x_shape, align_corners):
    _, bh, _, bw = _tables(x_shape[2:], dy.shape[2:], align_corners, dy.dtype, np)
    dx = np.empty(x_shape, dtype=dy.dtype)
    _backward_cpu(dy, dx, *bh, *bw)
    return dx


VARIANTS = {
    "cpu_v1": Variant("cpu", _cpu_forward, _cpu_backward, "Numba loops, parallel over planes"),
    "cuda_v1": Variant("cuda", lazy("bilinear_cuda", "forward"),
                       lazy("bilinear_cuda", "backward"),
                       "one thread per output (forward) / per input element (backward)"),
}
DEFAULT = {"cpu": "cpu_v1", "cuda": "cuda_v1"}


def check_size(x, size):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"interpolate: x must be 4-D (N, C, H, W), got shape {np.shape(x)}")
    size = (size, size) if np.isscalar(size) else tuple(size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in size):
        raise ValueError(f"interpolate: size must be a positive int or (H, W) pair, got {size!r}")
    if min(x.shape[2:]) < 1:
        raise ValueError(f"interpolate: empty input of shape {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"interpolate: x must be float32 or float64, got {x.dtype}")
    return tuple(int(s) for s in size)


def bilinear_forward(x, size, align_corners=False, variant=None):
    size = check_size(x, size)
    x = array_module(x).ascontiguousarray(x)
    return pick(VARIANTS, DEFAULT, x, variant).forward(x, size, bool(align_corners))


def bilinear_backward(dy, x_shape, align_corners=False, variant=None):
    if dy.ndim != 4 or len(x_shape) != 4 or tuple(dy.shape[:2]) != tuple(x_shape[:2]):
        raise ValueError(f"bilinear_backward: dy {dy.shape} does not fit x of shape {x_shape}")
    dy = array_module(dy).ascontiguousarray(dy)
    impl = pick(VARIANTS, DEFAULT, dy, variant)
    return impl.backward(dy, tuple(x_shape), bool(align_corners))
