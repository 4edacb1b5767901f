"""CUDA (numba.cuda) kernels for atrous convolution; the index math is in ``atrous_conv``.

The same kernels take CuPy arrays on a GPU, and NumPy arrays under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``), which is how CI runs them without a GPU.

No kernel here uses atomics.  Every output element is computed by exactly one thread that
*gathers* what it needs: for dx, thread (n, c, h, v) walks the kernel taps (p, q) and asks which
output position (i, j), if any, read pixel (h, v) through that tap — i = (h + pad − p·d) / s when
that division is exact and in range.  Scatter-adds with atomics would make float32 results
depend on thread timing (non-deterministic rounding) and contend on hot pixels.
"""
import math

import numba
import numpy as np
from ._cuda import cuda

from tinydeeplab.backend import array_module

from ._common import launch

TILE = 16  # v3: a block computes a TILE × TILE tile of the output matrix


@cuda.jit(device=True, inline=True)
def _tap_to_output(h, pad, p, d, s, Ho):
    """Output index i that reads input index h through kernel tap p, or -1 if none does."""
    t = h + pad - p * d
    if t < 0 or t % s != 0:
        return -1
    i = t // s
    return i if i < Ho else -1


# ---- v1: one thread per output element ---------------------------------------------------------
@cuda.jit
def _forward_v1_kernel(x, w, b, y, sh, sw, ph, pw, dh, dw):
    t = cuda.grid(1)
    N, K, Ho, Wo = y.shape
    if t >= N * K * Ho * Wo:
        return
    j, i, k, n = t % Wo, (t // Wo) % Ho, (t // (Wo * Ho)) % K, t // (Wo * Ho * K)
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    acc = b[k]
    for c in range(C):
        for p in range(w.shape[2]):
            h = i * sh - ph + p * dh
            if 0 <= h < H:
                for q in range(w.shape[3]):
                    v = j * sw - pw + q * dw
                    if 0 <= v < W:
                        acc += w[k, c, p, q] * x[n, c, h, v]
    y[n, k, i, j] = acc


@cuda.jit
def _dx_v1_kernel(w, dy, dx, sh, sw, ph, pw, dh, dw):
    t = cuda.grid(1)
    N, C, H, W = dx.shape
    if t >= N * C * H * W:
        return
    v, h, c, n = t % W, (t // W) % H, (t // (W * H)) % C, t // (W * H * C)
    K, Ho, Wo = dy.shape[1], dy.shape[2], dy.shape[3]
    acc = 0.0
    for p in range(w.shape[2]):
        i = _tap_to_output(h, ph, p, dh, sh, Ho)
        if i < 0:
            continue
        for q in range(w.shape[3]):
            j = _tap_to_output(v, pw, q, dw, sw, Wo)
            if j < 0:
                continue
            for k in range(K):
                acc += w[k, c, p, q] * dy[n, k, i, j]
    dx[n, c, h, v] = acc


@cuda.jit
def _dw_v1_kernel(x, dy, dwt, sh, sw, ph, pw, dh, dw):
    t = cuda.grid(1)
    K, C, kh, kw = dwt.shape
    if t >= K * C * kh * kw:
        return
    q, p, c, k = t % kw, (t // kw) % kh, (t // (kw * kh)) % C, t // (kw * kh * C)
    N, H, W = x.shape[0], x.shape[2], x.shape[3]
    acc = 0.0
    for n in range(N):
        for i in range(dy.shape[2]):
            h = i * sh - ph + p * dh
            if 0 <= h < H:
                for j in range(dy.shape[3]):
                    v = j * sw - pw + q * dw
                    if 0 <= v < W:
                        acc += dy[n, k, i, j] * x[n, c, h, v]
    dwt[k, c, p, q] = acc


def forward_v1(x, w, b, stride, padding, dilation):
    from .atrous_conv import output_size

    xp = array_module(x)
    Ho, Wo = output_size(x.shape[2], x.shape[3], w.shape[2], w.shape[3], stride, padding,
                         dilation)
    y = xp.empty((x.shape[0], w.shape[0], Ho, Wo), dtype=x.dtype)
    bias = b if b is not None else xp.zeros(w.shape[0], dtype=x.dtype)
    launch(_forward_v1_kernel, y.size, x, w, bias, y, *stride, *padding, *dilation)
    return y


def backward_v1(x, w, dy, stride, padding, dilation):
    xp = array_module(x)
    dx, dwt = xp.empty_like(x), xp.empty_like(w)
    launch(_dx_v1_kernel, dx.size, w, dy, dx, *stride, *padding, *dilation)
    launch(_dw_v1_kernel, dwt.size, x, dy, dwt, *stride, *padding, *dilation)
    return dx, dwt, dy.sum(axis=(0, 2, 3))


# ---- v2: im2col / col2im kernels; the GEMM is cupy.matmul (cuBLAS) -----------------------------
@cuda.jit
def _im2col_kernel(x, cols, kh, kw, sh, sw, ph, pw, dh, dw, r0, rows, Wo):
    # one thread per column-matrix entry: cols[(c,p,q), (n,ii,j)]
    t = cuda.grid(1)
    R, M = cols.shape
    if t >= R * M:
        return
    r, m = t // M, t % M
    c, p, q = r // (kh * kw), (r // kw) % kh, r % kw
    j, ii, n = m % Wo, (m // Wo) % rows, m // (Wo * rows)
    h = (r0 + ii) * sh - ph + p * dh
    v = j * sw - pw + q * dw
    if 0 <= h < x.shape[2] and 0 <= v < x.shape[3]:
        cols[r, m] = x[n, c, h, v]
    else:
        cols[r, m] = 0


@cuda.jit
def _col2im_kernel(cols, dx, kh, kw, sh, sw, ph, pw, dh, dw, r0, rows, Wo):
    # one thread per input pixel, gathering every column entry that was copied from it
    t = cuda.grid(1)
    nb, C, H, W = dx.shape
    if t >= nb * C * H * W:
        return
    v, h, c, n = t % W, (t // W) % H, (t // (W * H)) % C, t // (W * H * C)
    acc = dx[n, c, h, v]
    for p in range(kh):
        i = _tap_to_output(h, ph, p, dh, sh, r0 + rows)
        if i < r0:  # no tap, or an output row outside this chunk
            continue
        for q in range(kw):
            j = _tap_to_output(v, pw, q, dw, sw, Wo)
            if j >= 0:
                acc += cols[(c * kh + p) * kw + q, (n * rows + i - r0) * Wo + j]
    dx[n, c, h, v] = acc


def im2col_dilated(x, w_shape, stride, padding, dilation, r0, r1, Wo, cols=None):
    xp = array_module(x)
    nb, C = x.shape[:2]
    kh, kw = w_shape[2], w_shape[3]
    if cols is None:
        cols = xp.empty((C * kh * kw, nb * (r1 - r0) * Wo), dtype=x.dtype)
    launch(_im2col_kernel, cols.size, x, cols, kh, kw, *stride, *padding, *dilation, r0,
            r1 - r0, Wo)
    return cols


def col2im_dilated(cols, dx, w_shape, stride, padding, dilation, r0, r1, Wo):
    launch(_col2im_kernel, dx.size, cols, dx, w_shape[2], w_shape[3], *stride, *padding,
            *dilation, r0, r1 - r0, Wo)


@cuda.jit
def _shift_add_kernel(z, y, kh, kw, sh, sw, ph, pw, dh, dw):
    # kn2row's second step, one thread per output element gathering over the taps
    t = cuda.grid(1)
    nb, K, Ho, Wo = y.shape
    if t >= nb * K * Ho * Wo:
        return
    j, i, k, n = t % Wo, (t // Wo) % Ho, (t // (Wo * Ho)) % K, t // (Wo * Ho * K)
    acc = 0.0
    for p in range(kh):
        h = i * sh - ph + p * dh
        if 0 <= h < z.shape[2]:
            for q in range(kw):
                v = j * sw - pw + q * dw
                if 0 <= v < z.shape[3]:
                    acc += z[n, (k * kh + p) * kw + q, h, v]
    y[n, k, i, j] = acc


def shift_add(z, y, kh, kw, stride, padding, dilation):
    launch(_shift_add_kernel, y.size, z, y, kh, kw, *stride, *padding, *dilation)


# ---- v3: tiled shared-memory implicit GEMM -----------------------------------------------------
# The im2col matrix is never stored.  Each block computes a TILE × TILE tile of a matrix product
# A @ B by walking the reduction dimension TILE at a time: all threads together load one tile of A
# and one of B into shared memory (each value fetched from global memory once per block instead
# of TILE times), synchronise, and accumulate TILE products each.  B's entries are computed from
# x (or dy) by the im2col index math as they are loaded.
#
#   forward  Y[k, (n,i,j)]   = Σ_{(c,p,q)} W[k, (c,p,q)] · X_col[(c,p,q), (n,i,j)]
#   dW       dW[k, (c,p,q)]  = Σ_{(n,i,j)} dY[k, (n,i,j)] · X_col[(c,p,q), (n,i,j)]
#   dX       dX[c, (n,h,v)]  = Σ_{(k,p,q)} W[k, c, p, q] · dY_col[(k,p,q), (n,h,v)]
#
# where dY_col[(k,p,q), (n,h,v)] = dy[n, k, i, j] for the (i, j) that read (h, v) through tap
# (p, q) (see _tap_to_output), else 0.  Shared arrays need a compile-time dtype, so the kernels
# are built per dtype by _v3_kernels.
@cuda.jit(device=True, inline=True)
def _x_col(x, r, m, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo):
    c, p, q = r // (kh * kw), (r // kw) % kh, r % kw
    j, i, n = m % Wo, (m // Wo) % Ho, m // (Wo * Ho)
    h = i * sh - ph + p * dh
    v = j * sw - pw + q * dw
    if 0 <= h < x.shape[2] and 0 <= v < x.shape[3]:
        return x[n, c, h, v]
    return 0


@cuda.jit(device=True, inline=True)
def _dy_col(dy, r, m, kh, kw, sh, sw, ph, pw, dh, dw, H, W):
    k, p, q = r // (kh * kw), (r // kw) % kh, r % kw
    v, h, n = m % W, (m // W) % H, m // (W * H)
    i = _tap_to_output(h, ph, p, dh, sh, dy.shape[2])
    j = _tap_to_output(v, pw, q, dw, sw, dy.shape[3])
    if i >= 0 and j >= 0:
        return dy[n, k, i, j]
    return 0


_v3_cache = {}


def _v3_kernels(dtype):
    dtype = np.dtype(dtype)
    if dtype in _v3_cache:
        return _v3_cache[dtype]
    nbtype = numba.from_dtype(dtype)

    @cuda.jit
    def forward(x, w2d, b, y, kh, kw, sh, sw, ph, pw, dh, dw):
        sa = cuda.shared.array((TILE, TILE), nbtype)
        sb = cuda.shared.array((TILE, TILE), nbtype)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        K, R = w2d.shape
        N, _, Ho, Wo = y.shape
        M = N * Ho * Wo
        k = cuda.blockIdx.y * TILE + ty
        m = cuda.blockIdx.x * TILE + tx
        acc = nbtype(0)
        for r0 in range(0, R, TILE):
            sa[ty, tx] = w2d[k, r0 + tx] if k < K and r0 + tx < R else 0
            mm = cuda.blockIdx.x * TILE + tx
            sb[ty, tx] = (_x_col(x, r0 + ty, mm, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo)
                          if r0 + ty < R and mm < M else 0)
            cuda.syncthreads()
            for t in range(TILE):
                acc += sa[ty, t] * sb[t, tx]
            cuda.syncthreads()
        if k < K and m < M:
            y[m // (Wo * Ho), k, (m // Wo) % Ho, m % Wo] = acc + b[k]

    @cuda.jit
    def grad_w(x, dy, dw2d, kh, kw, sh, sw, ph, pw, dh, dw):
        sa = cuda.shared.array((TILE, TILE), nbtype)
        sb = cuda.shared.array((TILE, TILE), nbtype)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        K, R = dw2d.shape
        N, _, Ho, Wo = dy.shape
        M = N * Ho * Wo
        k = cuda.blockIdx.y * TILE + ty
        r = cuda.blockIdx.x * TILE + tx
        acc = nbtype(0)
        for m0 in range(0, M, TILE):
            m = m0 + tx  # sa[ty, t] = dY[k, m0 + t]
            sa[ty, tx] = (dy[m // (Wo * Ho), k, (m // Wo) % Ho, m % Wo]
                          if k < K and m < M else 0)
            rr = cuda.blockIdx.x * TILE + tx  # sb[t, tx] = X_col[r, m0 + t]
            sb[ty, tx] = (_x_col(x, rr, m0 + ty, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo)
                          if rr < R and m0 + ty < M else 0)
            cuda.syncthreads()
            for t in range(TILE):
                acc += sa[ty, t] * sb[t, tx]
            cuda.syncthreads()
        if k < K and r < R:
            dw2d[k, r] = acc

    @cuda.jit
    def grad_x(w, dy, dx, sh, sw, ph, pw, dh, dw):
        sa = cuda.shared.array((TILE, TILE), nbtype)
        sb = cuda.shared.array((TILE, TILE), nbtype)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        K, C, kh, kw = w.shape
        N, _, H, W = dx.shape
        R = K * kh * kw
        M = N * H * W
        c = cuda.blockIdx.y * TILE + ty
        m = cuda.blockIdx.x * TILE + tx
        acc = nbtype(0)
        for r0 in range(0, R, TILE):
            r = r0 + tx  # sa[ty, t] = W[k, c, p, q] with (k, p, q) = r0 + t
            sa[ty, tx] = (w[r // (kh * kw), c, (r // kw) % kh, r % kw]
                          if c < C and r < R else 0)
            sb[ty, tx] = (_dy_col(dy, r0 + ty, m, kh, kw, sh, sw, ph, pw, dh, dw, H, W)
                          if r0 + ty < R and m < M else 0)
            cuda.syncthreads()
            for t in range(TILE):
                acc += sa[ty, t] * sb[t, tx]
            cuda.syncthreads()
        if c < C and m < M:
            dx[m // (W * H), c, (m // W) % H, m % W] = acc

    _v3_cache[dtype] = forward, grad_w, grad_x
    return _v3_cache[dtype]


def _grid(cols, rows):
    return (math.ceil(cols / TILE), math.ceil(rows / TILE)), (TILE, TILE)


def forward_v3(x, w, b, stride, padding, dilation):
    from .atrous_conv import output_size

    xp = array_module(x)
    K, C, kh, kw = w.shape
    Ho, Wo = output_size(x.shape[2], x.shape[3], kh, kw, stride, padding, dilation)
    y = xp.empty((x.shape[0], K, Ho, Wo), dtype=x.dtype)
    bias = b if b is not None else xp.zeros(K, dtype=x.dtype)
    blocks, threads = _grid(x.shape[0] * Ho * Wo, K)
    _v3_kernels(x.dtype)[0][blocks, threads](x, w.reshape(K, -1), bias, y, kh, kw, *stride,
                                             *padding, *dilation)
    return y


def backward_v3(x, w, dy, stride, padding, dilation):
    xp = array_module(x)
    K, C, kh, kw = w.shape
    _, grad_w, grad_x = _v3_kernels(x.dtype)
    dw2d = xp.empty((K, C * kh * kw), dtype=x.dtype)
    blocks, threads = _grid(C * kh * kw, K)
    grad_w[blocks, threads](x, dy, dw2d, kh, kw, *stride, *padding, *dilation)
    dx = xp.empty_like(x)
    blocks, threads = _grid(x.shape[0] * x.shape[2] * x.shape[3], C)
    grad_x[blocks, threads](w, dy, dx, *stride, *padding, *dilation)
    return dx, dw2d.reshape(w.shape), dy.sum(axis=(0, 2, 3))
