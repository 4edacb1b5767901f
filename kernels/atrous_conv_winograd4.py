"""Winograd F(4×4, 3×3) with the channels last, for dilated 3×3 convolutions, stride 1 (the CPU
ladder's ``cpu_v6``): the transforms; the GEMMs, tiles and buffers are atrous_conv_winograd's
channels-last drivers with ``m=4``.

F(4, 3), from the interpolation points 0, ±1, ±2 and ∞, gives 4 outputs of a 3-tap correlation
from 6 inputs with 6 multiplications instead of 12; nested in both directions, a 4×4 block of
outputs (spaced d, the hole algorithm as in F(2×2)) from a 6×6 tile of inputs with 36 products
instead of 144:

    y = Aᵀ [ (G w Gᵀ) ⊙ (Bᵀ X B) ] A,   with BT4, G4, AT4 below

Over channels: 36 GEMMs with 4× fewer multiply-adds than im2col (F(2×2): 16 GEMMs, 2.25×), and
transformed tiles of 36/16 numbers per output instead of 16/4 — which counts, because the
channels-last transforms are bound by memory traffic.  Its matrices hold 4, 5 and 8 (and G
sixths and 24ths), so float32 results carry ~20× F(2×2)'s rounding: about 1e-5 of the largest
value against the float64 reference, where F(2×2) and im2col give 4-7e-7 (test_winograd
bounds it at 3e-5).  And its tiles, 4 outputs spaced d, overhang small maps more: the rule for
when it pays is ``atrous_conv.winograd_tile``.  Reference: ``atrous_conv_winograd.
winograd_reference(..., m=4)``.
"""
import numpy as np
from numba import njit, prange

from . import parallel_njit
from .atrous_conv_winograd import _Kernels, _stage_rows, _unstage_rows

# F(4, 3): 6 inputs, 4 outputs
BT4 = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
G4 = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
AT4 = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], np.float64)

# The same layout as cpu_v5's, with 6×6 tiles of inputs and 4×4 blocks of outputs.  Each 2-D
# transform is two passes of a 1-D one: down the tile's columns into a (6, 6, C) block, then
# along its rows, every pass an inner loop over channels.  The 1-D transforms below are BT4,
# AT4 and AT4ᵀ with their common subexpressions shared; the constants take the data's dtype
# (``dtype.type``) so that float32 stays float32.  The weight transforms run in float64 and
# round once (G holds sixths): a k at a time into a (36, C) block, copied out row by row —
# U's 36 rows lie K·C numbers apart, and 36 streams that far apart share a few cache sets
# (written side by side: 11 ms instead of 0.6 at 256 channels).


@njit(inline="always")
def _bt6(x0, x1, x2, x3, x4, x5, two, four, five):
    # Bᵀ x: the rows of BT4
    return (four * x0 - five * x2 + x4, (x3 + x4) - four * (x1 + x2),
            (x4 - x3) + four * (x1 - x2), (x4 - x2) - two * (x1 - x3),
            (x4 - x2) + two * (x1 - x3), four * x1 - five * x3 + x5)


@njit(inline="always")
def _at6(m0, m1, m2, m3, m4, m5, two, four, eight):
    # Aᵀ m: the rows of AT4
    s12, d12, s34, d34 = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return m0 + s12 + s34, d12 + two * d34, s12 + four * s34, d12 + eight * d34 + m5


@njit(inline="always")
def _a6(g0, g1, g2, g3, two, four, eight):
    # A g: the columns of AT4, the adjoint of _at6
    s02, s13 = g0 + g2, g1 + g3
    p02, p13 = g0 + four * g2, two * g1 + eight * g3
    return g0, s02 + s13, s02 - s13, p02 + p13, p02 - p13, g3


@njit(inline="always")
def _g6(w0, w1, w2):
    # G w: the rows of G4, in float64
    s, d = (w0 + w2) * (1 / 6), w1 * (1 / 6)
    e, f = w0 * (1 / 24) + w2 * (1 / 6), w1 * (1 / 12)
    return w0 * 0.25, -(s + d), d - s, e + f, e - f, w2 * 1.0


@njit(inline="always")
def _gt6(u0, u1, u2, u3, u4, u5):
    # Gᵀ u, the adjoint of _g6, in float64
    s12, d12, s34, d34 = u1 + u2, u2 - u1, u3 + u4, u3 - u4
    return (u0 * 0.25 - s12 * (1 / 6) + s34 * (1 / 24), d12 * (1 / 6) + d34 * (1 / 12),
            (s34 - s12) * (1 / 6) + u5)


def _input_transform4_cl(xh, V, rows, cols, dh, dw):
    # V[6u + v, p, c] = (Bᵀ X B)[u, v] for tile p = (n, tr, tc), X 6×6 spaced (dh, dw)
    N, C = xh.shape[0], xh.shape[3]
    TR, TC = rows.shape[0], cols.shape[0]
    two, four, five = xh.dtype.type(2), xh.dtype.type(4), xh.dtype.type(5)
    for r in prange(N * TR):
        n, i0 = r // TR, rows[r % TR]
        t = np.empty((6, 6, C), xh.dtype)
        for tc in range(TC):
            j0 = cols[tc]
            p = r * TC + tc
            for v in range(6):  # Bᵀ down each column of the tile
                j = j0 + v * dw
                for c in range(C):
                    b0, b1, b2, b3, b4, b5 = _bt6(
                        xh[n, i0, j, c], xh[n, i0 + dh, j, c], xh[n, i0 + 2 * dh, j, c],
                        xh[n, i0 + 3 * dh, j, c], xh[n, i0 + 4 * dh, j, c],
                        xh[n, i0 + 5 * dh, j, c], two, four, five)
                    t[0, v, c], t[1, v, c], t[2, v, c] = b0, b1, b2
                    t[3, v, c], t[4, v, c], t[5, v, c] = b3, b4, b5
            for u in range(6):  # then B along each row
                for c in range(C):
                    b0, b1, b2, b3, b4, b5 = _bt6(t[u, 0, c], t[u, 1, c], t[u, 2, c],
                                                  t[u, 3, c], t[u, 4, c], t[u, 5, c],
                                                  two, four, five)
                    V[6 * u, p, c], V[6 * u + 1, p, c], V[6 * u + 2, p, c] = b0, b1, b2
                    V[6 * u + 3, p, c], V[6 * u + 4, p, c], V[6 * u + 5, p, c] = b3, b4, b5


def _output_transform4_cl(M, y, rows, cols, dh, dw):
    # y[n, k, i0 + s·dh, j0 + t·dw] = (Aᵀ M A)[s, t]; a tile row's four output rows are
    # staged channels last in ``out`` (rows K + 16 long: see STAGING in
    # atrous_conv_winograd), then copied to y
    N, K, Ho, Wo = y.shape
    TR, TC = rows.shape[0], cols.shape[0]
    two, four, eight = M.dtype.type(2), M.dtype.type(4), M.dtype.type(8)
    for r in prange(N * TR):
        n, i0 = r // TR, rows[r % TR]
        t = np.empty((4, 6, K), M.dtype)
        out = np.empty((4, Wo + 3 * dw, K + 16), y.dtype)
        for tc in range(TC):
            j0 = cols[tc]
            p = r * TC + tc
            for v in range(6):  # Aᵀ down each column
                for k in range(K):
                    a0, a1, a2, a3 = _at6(M[v, p, k], M[6 + v, p, k], M[12 + v, p, k],
                                          M[18 + v, p, k], M[24 + v, p, k], M[30 + v, p, k],
                                          two, four, eight)
                    t[0, v, k], t[1, v, k], t[2, v, k], t[3, v, k] = a0, a1, a2, a3
            for s in range(4):  # then · A along each row
                for k in range(K):
                    a0, a1, a2, a3 = _at6(t[s, 0, k], t[s, 1, k], t[s, 2, k], t[s, 3, k],
                                          t[s, 4, k], t[s, 5, k], two, four, eight)
                    out[s, j0, k], out[s, j0 + dw, k] = a0, a1
                    out[s, j0 + 2 * dw, k], out[s, j0 + 3 * dw, k] = a2, a3
        _unstage_rows(out, y, n, i0, dh)  # rows past the end are dropped


def _output_transform4_adjoint_cl(dy, dM, rows, cols, dh, dw):
    # dM[6u + v, p, k] = (A dY Aᵀ)[u, v]: the transpose of _output_transform4_cl, dy's four
    # rows of a tile row staged channels last (zero past the edges) first
    N, K, Ho, Wo = dy.shape
    TR, TC = rows.shape[0], cols.shape[0]
    two, four, eight = dy.dtype.type(2), dy.dtype.type(4), dy.dtype.type(8)
    for r in prange(N * TR):
        n, i0 = r // TR, rows[r % TR]
        g = np.zeros((4, Wo + 3 * dw, K + 16), dy.dtype)  # see STAGING (atrous_conv_winograd)
        h = np.empty((4, 6, K), dy.dtype)
        _stage_rows(dy, g, n, i0, dh)
        for tc in range(TC):
            j0 = cols[tc]
            p = r * TC + tc
            for s in range(4):  # A along each row of dY
                for k in range(K):
                    a0, a1, a2, a3, a4, a5 = _a6(g[s, j0, k], g[s, j0 + dw, k],
                                                 g[s, j0 + 2 * dw, k], g[s, j0 + 3 * dw, k],
                                                 two, four, eight)
                    h[s, 0, k], h[s, 1, k], h[s, 2, k] = a0, a1, a2
                    h[s, 3, k], h[s, 4, k], h[s, 5, k] = a3, a4, a5
            for v in range(6):  # then down each column
                for k in range(K):
                    a0, a1, a2, a3, a4, a5 = _a6(h[0, v, k], h[1, v, k], h[2, v, k], h[3, v, k],
                                                 two, four, eight)
                    dM[v, p, k], dM[6 + v, p, k], dM[12 + v, p, k] = a0, a1, a2
                    dM[18 + v, p, k], dM[24 + v, p, k], dM[30 + v, p, k] = a3, a4, a5


def _weight_transform4(w, U, flip):
    # U[6a + b, k, c] = (G w[k, c] Gᵀ)[a, b] (of w[k, c] turned by 180° with ``flip``)
    K, C = w.shape[0], w.shape[1]
    first, last = (2, 0) if flip else (0, 2)
    for k in prange(K):
        blk = np.empty((36, C), U.dtype)
        for c in range(C):
            g0 = _g6(w[k, c, first, first] * 1.0, w[k, c, 1, first] * 1.0,
                     w[k, c, last, first] * 1.0)  # G w, column by column
            g1 = _g6(w[k, c, first, 1] * 1.0, w[k, c, 1, 1] * 1.0, w[k, c, last, 1] * 1.0)
            g2 = _g6(w[k, c, first, last] * 1.0, w[k, c, 1, last] * 1.0,
                     w[k, c, last, last] * 1.0)
            for a in range(6):  # then · Gᵀ along each row
                u0, u1, u2, u3, u4, u5 = _g6(g0[a], g1[a], g2[a])
                blk[6 * a, c], blk[6 * a + 1, c], blk[6 * a + 2, c] = u0, u1, u2
                blk[6 * a + 3, c], blk[6 * a + 4, c], blk[6 * a + 5, c] = u3, u4, u5
        for e in range(36):
            U[e, k, :] = blk[e]


def _weight_transform4_adjoint(dU, dw):
    # dw[k, c] = Gᵀ dU[k, c] G: the transpose of _weight_transform4
    K, C = dw.shape[0], dw.shape[1]
    for k in prange(K):
        blk = np.empty((36, C), dU.dtype)
        for e in range(36):
            blk[e] = dU[e, k, :]
        t = np.empty((3, 6))
        for c in range(C):
            for b in range(6):  # Gᵀ down each column b: dU[b], dU[6 + b], ..., dU[30 + b]
                t[0, b], t[1, b], t[2, b] = _gt6(
                    blk[b, c] * 1.0, blk[6 + b, c] * 1.0, blk[12 + b, c] * 1.0,
                    blk[18 + b, c] * 1.0, blk[24 + b, c] * 1.0, blk[30 + b, c] * 1.0)
            for a in range(3):  # then · G along each row
                dw[k, c, a, 0], dw[k, c, a, 1], dw[k, c, a, 2] = _gt6(
                    t[a, 0], t[a, 1], t[a, 2], t[a, 3], t[a, 4], t[a, 5])


KERNELS = _Kernels(*(parallel_njit(f) for f in (
    _input_transform4_cl, _output_transform4_cl, _output_transform4_adjoint_cl,
    _weight_transform4, _weight_transform4_adjoint)), (BT4, G4, AT4))
