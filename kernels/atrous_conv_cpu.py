"""CPU (Numba) kernels for atrous convolution; the index math is in ``atrous_conv``'s docstring.

Kernel bodies are plain Python compiled at module level, so ``NUMBA_DISABLE_JIT=1`` runs them
as ordinary Python for debugging.  Parallel loops (``prange``) always run over outputs that no
other iteration writes, so there are no races and no atomics.
"""
import numpy as np
from numba import njit, prange

from . import parallel_njit


# ---- v1: naive direct loops, straight from the formulas ---------------------------------------
def _forward_v1(x, w, b, y, sh, sw, ph, pw, dh, dw):
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    _, _, Ho, Wo = y.shape
    for nk in prange(N * K):  # one (image, filter) output plane per iteration
        n, k = nk // K, nk % K
        for i in range(Ho):
            for j in range(Wo):
                acc = b[k]
                for c in range(C):
                    for p in range(kh):
                        h = i * sh - ph + p * dh
                        if h < 0 or h >= H:
                            continue
                        for q in range(kw):
                            v = j * sw - pw + q * dw
                            if 0 <= v < W:
                                acc += w[k, c, p, q] * x[n, c, h, v]
                y[n, k, i, j] = acc


def _backward_v1(x, w, dy, dx, dwt, db, sh, sw, ph, pw, dh, dw):
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    _, _, Ho, Wo = dy.shape
    # dx: each (n, c) input plane belongs to one iteration, so the scatter cannot race.
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for k in range(K):
            for p in range(kh):
                for q in range(kw):
                    for i in range(Ho):
                        h = i * sh - ph + p * dh
                        if h < 0 or h >= H:
                            continue
                        for j in range(Wo):
                            v = j * sw - pw + q * dw
                            if 0 <= v < W:
                                dx[n, c, h, v] += w[k, c, p, q] * dy[n, k, i, j]
    # dw and db: each weight is a sum over images and output positions.
    for kc in prange(K * C):
        k, c = kc // C, kc % C
        for p in range(kh):
            for q in range(kw):
                acc = 0.0
                for n in range(N):
                    for i in range(Ho):
                        h = i * sh - ph + p * dh
                        if h < 0 or h >= H:
                            continue
                        for j in range(Wo):
                            v = j * sw - pw + q * dw
                            if 0 <= v < W:
                                acc += dy[n, k, i, j] * x[n, c, h, v]
                dwt[k, c, p, q] = acc
    for k in prange(K):
        acc = 0.0
        for n in range(N):
            for i in range(Ho):
                for j in range(Wo):
                    acc += dy[n, k, i, j]
        db[k] = acc


_forward_v1_cpu = parallel_njit(_forward_v1)
_backward_v1_cpu = parallel_njit(_backward_v1)


def forward_v1(x, w, b, stride, padding, dilation):
    from .atrous_conv import output_size

    Ho, Wo = output_size(x.shape[2], x.shape[3], w.shape[2], w.shape[3], stride, padding,
                         dilation)
    y = np.empty((x.shape[0], w.shape[0], Ho, Wo), dtype=x.dtype)
    bias = b if b is not None else np.zeros(w.shape[0], dtype=x.dtype)
    _forward_v1_cpu(x, w, bias, y, *stride, *padding, *dilation)
    return y


def backward_v1(x, w, dy, stride, padding, dilation):
    dx = np.zeros_like(x)
    dw = np.empty_like(w)
    db = np.empty(w.shape[0], dtype=x.dtype)
    _backward_v1_cpu(x, w, dy, dx, dw, db, *stride, *padding, *dilation)
    return dx, dw, db


# ---- v2: im2col with holes, then one GEMM ------------------------------------------------------
def _valid_columns(off, s, W, Wo):
    """The range [j_lo, j_hi) of output columns j whose input column j·s + off lies in [0, W).

    Computing it once per kernel row keeps the bounds test out of the innermost loop.
    """
    j_lo = 0 if off >= 0 else (-off + s - 1) // s
    j_hi = 0 if W - 1 - off < 0 else (W - 1 - off) // s + 1
    j_hi = min(j_hi, Wo)
    return j_lo, max(j_lo, j_hi)


def _im2col(planes, cols, kh, kw, sh, sw, ph, pw, dh, dw, r0, r1, Wo, H, W):
    # x (nb, C, H, W) -> cols (C·kh·kw, nb·rows·Wo), rows = r1 - r0 output rows from r0.
    # planes is x split into its phase planes (``phase_planes``), planes[n, c, a, s, u, b] =
    # x[n, c, u·sh + a, b·sw + s], so that the input columns one output row reads (every sw-th
    # from j·sw + off) are contiguous: column j·sw + off = (j + cb)·sw + s with s = off mod sw,
    # cb = ⌊off / sw⌋ (input row h likewise lies in plane a = h mod sh, at u = ⌊h / sh⌋).  Each
    # output row is then one contiguous slice copy (vectorised by LLVM) between two runs of
    # zeros.
    nb, C = planes.shape[0], planes.shape[1]
    rows = r1 - r0
    for r in prange(C * kh * kw):  # each column-matrix row is written by one iteration
        c, p, q = r // (kh * kw), (r // kw) % kh, r % kw
        off = q * dw - pw
        j_lo, j_hi = _valid_columns(off, sw, W, Wo)
        s, cb = off % sw, off // sw
        for n in range(nb):
            for ii in range(rows):
                h = (r0 + ii) * sh - ph + p * dh
                out = cols[r, (n * rows + ii) * Wo:(n * rows + ii + 1) * Wo]
                if h < 0 or h >= H or j_lo == j_hi:
                    out[:] = 0
                    continue
                out[:j_lo] = 0
                out[j_lo:j_hi] = planes[n, c, h % sh, s, h // sh, j_lo + cb:j_hi + cb]
                out[j_hi:] = 0


def _im2col_same_width(planes, cols, kh, kw, ph, pw, dh, dw, r0, r1):
    # _im2col where the output is as wide as the input's phase planes, Wo = ⌈W / sw⌉: stride 1
    # with padding = dilation (DeepLab's 3×3 layers), and the stride-2 stems and 3×3s.
    # planes[n, c, a, b] = x[n, c, a::sh, b::sw], zero-padded to Hq × Wq = ⌈H/sh⌉ × ⌈W/sw⌉
    # (for stride 1, x itself).  Output row i of tap (p, q) reads input row i·sh + offh, with
    # offh = p·dh − ph: row i + ⌊offh/sh⌋ of the phase planes a = offh mod sh (columns
    # likewise).  So the tap's block for image n is one phase plane read flat from an offset:
    # one contiguous copy, then zeros where the shift wrapped past a row end (the first or
    # last |ow| columns of each row) and on rows outside the plane.  Row-by-row copies cost a
    # slice per 21-81 values: this is ~4× faster on DeepLab's small stride-1 planes and takes
    # 0.6-0.95 of the time on the strided ones (benchmarks/bench_conv_rules.py).
    nb, C, sh, sw, Hq, Wq = planes.shape
    rows = r1 - r0
    L = rows * Wq
    for r in prange(C * kh * kw):
        c, p, q = r // (kh * kw), (r // kw) % kh, r % kw
        offh, offw = p * dh - ph, q * dw - pw
        a, b = offh % sh, offw % sw  # the phase plane this tap reads
        oh, ow = r0 + offh // sh, offw // sw  # plane[ii + oh, j + ow] -> block[ii·Wq + j]
        i_lo, i_hi = max(0, -oh), min(rows, Hq - oh)  # rows ii that lie inside the plane
        for n in range(nb):
            block = cols[r, n * L:(n + 1) * L]
            if i_lo >= i_hi or ow >= Wq or -ow >= Wq:
                block[:] = 0
                continue
            plane = planes[n, c, a, b].reshape(Hq * Wq)
            base = oh * Wq + ow  # the plane index that block[0] would read
            lo, hi = max(i_lo * Wq, -base), min(i_hi * Wq, Hq * Wq - base)
            block[:lo] = 0
            block[lo:hi] = plane[lo + base:hi + base]
            block[hi:] = 0
            if ow > 0:  # the last ow columns of each row read the next row: zero them
                for ii in range(i_lo, i_hi):
                    block[ii * Wq + Wq - ow:ii * Wq + Wq] = 0
            elif ow < 0:  # the first −ow columns read the previous row
                for ii in range(i_lo, i_hi):
                    block[ii * Wq:ii * Wq - ow] = 0


def _col2im(cols, dx, kh, kw, sh, sw, ph, pw, dh, dw, r0, r1, Wo):
    # the transpose of _im2col: dx (nb, C, H, W) += scatter of cols
    nb, C, H, W = dx.shape
    rows = r1 - r0
    for nc in prange(nb * C):  # one input plane per iteration: the scatter-add cannot race
        n, c = nc // C, nc % C
        for p in range(kh):
            for q in range(kw):
                r = (c * kh + p) * kw + q
                off = q * dw - pw
                j_lo, j_hi = _valid_columns(off, sw, W, Wo)
                if j_lo == j_hi:
                    continue
                v_lo, v_hi = j_lo * sw + off, (j_hi - 1) * sw + off + 1
                for ii in range(rows):
                    h = (r0 + ii) * sh - ph + p * dh
                    if h < 0 or h >= H:
                        continue
                    base = (n * rows + ii) * Wo
                    if sw == 1:
                        dx[n, c, h, v_lo:v_hi] += cols[r, base + j_lo:base + j_hi]
                    else:
                        dx[n, c, h, v_lo:v_hi:sw] += cols[r, base + j_lo:base + j_hi]


def _shift_add(z, y, kh, kw, sh, sw, ph, pw, dh, dw):
    # kn2row: y[n,k,i,j] = Σ_{p,q} z[n, (k,p,q), i·s − pad + p·d, j·s − pad + q·d]
    nb, K, Ho, Wo = y.shape
    H, W = z.shape[2], z.shape[3]
    for nk in prange(nb * K):  # one output plane per iteration
        n, k = nk // K, nk % K
        y[n, k] = 0
        for p in range(kh):
            for q in range(kw):
                r = (k * kh + p) * kw + q
                off = q * dw - pw
                j_lo, j_hi = _valid_columns(off, sw, W, Wo)
                if j_lo == j_hi:
                    continue
                v_lo, v_hi = j_lo * sw + off, (j_hi - 1) * sw + off + 1
                for i in range(Ho):
                    h = i * sh - ph + p * dh
                    if h < 0 or h >= H:
                        continue
                    if sw == 1:
                        y[n, k, i, j_lo:j_hi] += z[n, r, h, v_lo:v_hi]
                    else:
                        y[n, k, i, j_lo:j_hi] += z[n, r, h, v_lo:v_hi:sw]


_valid_columns = njit(inline="always", cache=True)(_valid_columns)
_im2col_cpu = parallel_njit(_im2col)
_im2col_same_width_cpu = parallel_njit(_im2col_same_width)
_col2im_cpu = parallel_njit(_col2im)
_shift_add_cpu = parallel_njit(_shift_add)


def phase_planes(x, stride):
    """x (nb, C, H, W) as (nb, C, sh, sw, ⌈H/sh⌉, ⌈W/sw⌉) phase planes,
    planes[n,c,a,b,u,v] = x[n,c,u·sh+a,v·sw+b], zero past the image.  For stride 1 a view;
    otherwise a copy of the input (not of the 9-49× larger columns) that turns im2col's
    strided reads into contiguous ones: ~2× faster for the 7×7/2 stem."""
    nb, C, H, W = x.shape
    sh, sw = stride
    if (sh, sw) == (1, 1):
        return np.ascontiguousarray(x).reshape(nb, C, 1, 1, H, W)
    Hq, Wq = -(-H // sh), -(-W // sw)
    planes = np.zeros((nb, C, sh, sw, Hq, Wq), dtype=x.dtype)
    for a in range(sh):
        for b in range(sw):
            plane = x[:, :, a::sh, b::sw]
            planes[:, :, a, b, :plane.shape[2], :plane.shape[3]] = plane
    return planes


def im2col_rows(x, w_shape, stride, padding, dilation, r0, r1, Wo, cols):
    """The general im2col: one slice copy per output row (any stride, padding, dilation)."""
    _im2col_cpu(phase_planes(x, stride), cols, w_shape[2], w_shape[3], *stride, *padding,
                *dilation, r0, r1, Wo, *x.shape[2:])
    return cols


def im2col_dilated(x, w_shape, stride, padding, dilation, r0, r1, Wo, cols=None):
    """Columns of output rows r0..r1 of every image in x: (C·kh·kw, nb·(r1−r0)·Wo)."""
    nb, C = x.shape[:2]
    kh, kw = w_shape[2], w_shape[3]
    if cols is None:
        cols = np.empty((C * kh * kw, nb * (r1 - r0) * Wo), dtype=x.dtype)
    if Wo == -(-x.shape[3] // stride[1]):  # as wide as the phase planes: shifted copies
        _im2col_same_width_cpu(phase_planes(x, stride), cols, kh, kw, *padding, *dilation,
                               r0, r1)
        return cols
    return im2col_rows(x, w_shape, stride, padding, dilation, r0, r1, Wo, cols)


def col2im_dilated(cols, dx, w_shape, stride, padding, dilation, r0, r1, Wo):
    """dx += col2im(cols) in place (dx: the images the columns came from)."""
    _col2im_cpu(cols, dx, w_shape[2], w_shape[3], *stride, *padding, *dilation, r0, r1, Wo)


def shift_add(z, y, kh, kw, stride, padding, dilation):
    """y = Σ over taps of the shifted tap planes of z (kn2row's second step), in place."""
    _shift_add_cpu(z, y, kh, kw, *stride, *padding, *dilation)
