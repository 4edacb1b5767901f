"""Winograd F(2×2, 3×3) for dilated 3×3 convolutions, stride 1 (the CPU ladder's ``cpu_v4``).

The hole algorithm, again.  With stride 1, output row i reads input rows i − pad + p·d,
p = 0, 1, 2: rows that differ by multiples of d.  So the outputs i0 and i0 + d read rows
i0 − pad + d·u for u = 0..3 — four rows spaced d apart — and they are an ordinary (undilated)
3-tap correlation of those four values:

    y[i0]     = w0·x[u=0] + w1·x[u=1] + w2·x[u=2]
    y[i0 + d] = w0·x[u=1] + w1·x[u=2] + w2·x[u=3]

Winograd's minimal filtering algorithm F(2, 3) (Lavin & Gray 2016) computes those two outputs
with 4 multiplications instead of 6:

    y = Aᵀ [ (G w) ⊙ (Bᵀ x) ],   Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1],
                                 G  = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1],   Aᵀ = [1 1 1 0; 0 1 −1 −1]

and nested in both directions, F(2×2, 3×3) gives a 2×2 block of outputs (rows i0, i0 + d;
columns j0, j0 + d) from a 4×4 tile of inputs (rows and columns spaced d) with 16
multiplications instead of 36.  Over channels the products become 16 matrix products:

    U[e] = (G w Gᵀ)[e]        (K × C, e = one of the 16 transformed positions)
    V[e] = (Bᵀ X B)[e]        (C × P, one column per tile)
    M[e] = U[e] · V[e]        (K × P: 16 GEMMs, 2.25× fewer multiply-adds than im2col's one)
    Y    = Aᵀ M A             (2×2 outputs per tile)

Tiles: for each residue a = i0 mod d, the outputs a, a + d, a + 2d, ... are paired two by
two, so tile origins are i0 = a + 2d·t.  The backward with respect to x is the same
convolution of dy with the kernel flipped and K, C swapped (padding 2d − pad); the weight
gradient stays with im2col (``atrous_conv._weights_backward``).  The transforms add rounding:
float32 results differ from the float64 reference by a few 1e-6 relative — like a GEMM's
different summation order, checked by the same tests.

Ladder: ``winograd_reference`` (NumPy, float64, the formulas above written out) → the Numba
transforms here, parallel over channels, with the GEMMs in BLAS.
"""
import numpy as np
from numba import prange

from . import parallel_njit

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)


def tile_origins(n_out, d):
    """First output index of every 2-output tile along one axis: a + 2d·t for each residue a."""
    return np.array([i for a in range(min(d, n_out)) for i in range(a, n_out, 2 * d)],
                    np.int64)


def applies(w_shape, stride):
    """Whether cpu_v4 computes this convolution by Winograd (else by cpu_v3's lowering)."""
    return tuple(w_shape[2:]) == (3, 3) and tuple(stride) == (1, 1)


def _weight_transform(w, U):
    # U[4a + b, k, c] = (G w[k, c] Gᵀ)[a, b], G's rows (1 0 0), (½ ½ ½), (½ −½ ½), (0 0 1)
    K, C = w.shape[0], w.shape[1]
    for k in prange(K):
        t = np.empty((4, 3), w.dtype)
        for c in range(C):
            for q in range(3):  # G w: the rows of w combined
                w0, w1, w2 = w[k, c, 0, q], w[k, c, 1, q], w[k, c, 2, q]
                t[0, q], t[1, q], t[2, q], t[3, q] = w0, (w0 + w1 + w2) / 2, \
                    (w0 - w1 + w2) / 2, w2
            for a in range(4):  # then · Gᵀ: the columns combined
                t0, t1, t2 = t[a, 0], t[a, 1], t[a, 2]
                U[4 * a + 0, k, c] = t0
                U[4 * a + 1, k, c] = (t0 + t1 + t2) / 2
                U[4 * a + 2, k, c] = (t0 - t1 + t2) / 2
                U[4 * a + 3, k, c] = t2


_weight_transform_cpu = parallel_njit(_weight_transform)


def weight_transform(w):
    """U (16, K, C) = G w Gᵀ for every (k, c), flattened over the 4×4 positions (w's dtype)."""
    w = np.ascontiguousarray(w)
    U = np.empty((16, w.shape[0], w.shape[1]), w.dtype)
    _weight_transform_cpu(w, U)
    return U


# ---- the reference: the formulas written out in NumPy, float64 --------------------------------
def winograd_reference(x, w, b, padding, dilation):
    """y of the dilated 3×3 convolution (stride 1) by F(2×2, 3×3), in float64."""
    N, C, H, W = x.shape
    K = w.shape[0]
    (ph, pw), (dh, dw) = padding, dilation
    Ho, Wo = H + 2 * ph - 2 * dh, W + 2 * pw - 2 * dw
    rows, cols = tile_origins(Ho, dh), tile_origins(Wo, dw)
    xp = np.zeros((N, C, H + 2 * ph + 3 * dh, W + 2 * pw + 3 * dw))  # room for the last tile
    xp[:, :, ph:ph + H, pw:pw + W] = x
    U = np.einsum("ap,kcpq,bq->abkc", G, w, G)  # G w Gᵀ for every (k, c)
    y = np.zeros((N, K, Ho, Wo))
    for i0 in rows:
        for j0 in cols:
            tile = xp[:, :, i0:i0 + 4 * dh:dh, j0:j0 + 4 * dw:dw]  # (N, C, 4, 4)
            V = np.einsum("au,ncuv,bv->abnc", BT, tile, BT)  # Bᵀ X B
            M = np.einsum("abkc,abnc->abnk", U, V)  # the 16 products, summed over c
            out = np.einsum("sa,abnk,tb->nkst", AT, M, AT)  # Aᵀ M A: (N, K, 2, 2)
            for s in range(2):
                for t in range(2):
                    i, j = i0 + s * dh, j0 + t * dw
                    if i < Ho and j < Wo:
                        y[:, :, i, j] = out[:, :, s, t]
    return y if b is None else y + b.reshape(1, K, 1, 1)


# ---- the fast rung: Numba transforms around 16 BLAS GEMMs ---------------------------------------
def _input_transform(x, V, rows, cols, ph, pw, dh, dw):
    # V[e, c, p] = (Bᵀ X B)[e] for tile p = (n, tr, tc), X = the 4×4 inputs spaced (dh, dw)
    N, C, H, W = x.shape
    TR, TC = rows.shape[0], cols.shape[0]
    for c in prange(C):
        t = np.empty((4, 4), x.dtype)
        for n in range(N):
            for tr in range(TR):
                h0 = rows[tr] - ph
                for tc in range(TC):
                    v0 = cols[tc] - pw
                    for u in range(4):
                        h = h0 + u * dh
                        for v in range(4):
                            q = v0 + v * dw
                            t[u, v] = x[n, c, h, q] if 0 <= h < H and 0 <= q < W else 0
                    p = (n * TR + tr) * TC + tc
                    for v in range(4):  # Bᵀ along the rows, column by column
                        a0, a1, a2, a3 = t[0, v], t[1, v], t[2, v], t[3, v]
                        t[0, v], t[1, v], t[2, v], t[3, v] = a0 - a2, a1 + a2, a2 - a1, a1 - a3
                    for u in range(4):  # then B along the columns
                        a0, a1, a2, a3 = t[u, 0], t[u, 1], t[u, 2], t[u, 3]
                        V[4 * u + 0, c, p] = a0 - a2
                        V[4 * u + 1, c, p] = a1 + a2
                        V[4 * u + 2, c, p] = a2 - a1
                        V[4 * u + 3, c, p] = a1 - a3


def _output_transform(M, y, rows, cols, dh, dw):
    # y[n, k, i0 + s·dh, j0 + t·dw] = (Aᵀ M A)[s, t] for tile p = (n, tr, tc)
    N, K, Ho, Wo = y.shape
    TR, TC = rows.shape[0], cols.shape[0]
    for k in prange(K):
        m = np.empty((4, 4), M.dtype)
        for n in range(N):
            for tr in range(TR):
                for tc in range(TC):
                    p = (n * TR + tr) * TC + tc
                    for e in range(16):
                        m[e // 4, e % 4] = M[e, k, p]
                    r0 = m[0, 0] + m[1, 0] + m[2, 0]  # Aᵀ M: two rows, per column
                    r1 = m[0, 1] + m[1, 1] + m[2, 1]
                    r2 = m[0, 2] + m[1, 2] + m[2, 2]
                    r3 = m[0, 3] + m[1, 3] + m[2, 3]
                    s0 = m[1, 0] - m[2, 0] - m[3, 0]
                    s1 = m[1, 1] - m[2, 1] - m[3, 1]
                    s2 = m[1, 2] - m[2, 2] - m[3, 2]
                    s3 = m[1, 3] - m[2, 3] - m[3, 3]
                    i0, j0 = rows[tr], cols[tc]
                    i1, j1 = i0 + dh, j0 + dw
                    y[n, k, i0, j0] = r0 + r1 + r2  # then · A
                    if j1 < Wo:
                        y[n, k, i0, j1] = r1 - r2 - r3
                    if i1 < Ho:
                        y[n, k, i1, j0] = s0 + s1 + s2
                        if j1 < Wo:
                            y[n, k, i1, j1] = s1 - s2 - s3


_input_transform_cpu = parallel_njit(_input_transform)
_output_transform_cpu = parallel_njit(_output_transform)


def _input_tiles(x, K, rows, cols, padding, dilation, budget, buffer):
    """For chunks of images whose transformed tiles (V, and the K-row M beside it) fit in
    ``budget``: yields (n0, n1, V), V (16, C, tiles of images n0..n1) = Bᵀ X B."""
    N, C = x.shape[:2]
    tiles = rows.shape[0] * cols.shape[0]
    step = max(1, min(N, budget // max(16 * (C + K) * tiles * x.itemsize, 1)))
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        V = buffer("winograd_V", (16, C, (n1 - n0) * tiles), x.dtype)
        _input_transform_cpu(x[n0:n1], V, rows, cols, *padding, *dilation)
        yield n0, n1, V


def _fresh(name, shape, dtype):
    return np.empty(shape, dtype)


def forward(x, w, b, padding, dilation, budget, buffer=_fresh):
    """y (float32 or float64, like x) by Winograd F(2×2, 3×3); images in chunks so that the
    transformed tiles (V and M) stay within ``budget`` bytes.  ``buffer(name, shape, dtype)``
    gives the scratch arrays (atrous_conv keeps them between calls: fresh large arrays cost
    page faults)."""
    N, C, H, W = x.shape
    K = w.shape[0]
    (ph, pw), (dh, dw) = padding, dilation
    Ho, Wo = H + 2 * ph - 2 * dh, W + 2 * pw - 2 * dw
    rows, cols = tile_origins(Ho, dh), tile_origins(Wo, dw)
    U = weight_transform(w.astype(x.dtype, copy=False))
    y = np.empty((N, K, Ho, Wo), x.dtype)
    for n0, n1, V in _input_tiles(x, K, rows, cols, padding, dilation, budget, buffer):
        M = buffer("winograd_M", (16, K, V.shape[2]), x.dtype)
        np.matmul(U, V, out=M)  # 16 GEMMs
        _output_transform_cpu(M, y[n0:n1], rows, cols, dh, dw)
    if b is not None:
        y += b.reshape(1, K, 1, 1)
    return y


def _output_transform_adjoint(dy, dM, rows, cols, dh, dw):
    # dM[e, k, p] = (A dY Aᵀ)[e] for tile p, dY the tile's 2×2 block of dy (0 past the edge):
    # the transpose of _output_transform, so that dU = dM · Vᵀ is the gradient of U
    N, K, Ho, Wo = dy.shape
    TR, TC = rows.shape[0], cols.shape[0]
    zero = dy[0, 0, 0, 0] * 0
    for k in prange(K):
        r = np.empty((4, 2), dM.dtype)
        for n in range(N):
            for tr in range(TR):
                for tc in range(TC):
                    i0, j0 = rows[tr], cols[tc]
                    i1, j1 = i0 + dh, j0 + dw
                    g00, g01, g10, g11 = dy[n, k, i0, j0], zero, zero, zero
                    if j1 < Wo:
                        g01 = dy[n, k, i0, j1]
                    if i1 < Ho:
                        g10 = dy[n, k, i1, j0]
                        if j1 < Wo:
                            g11 = dy[n, k, i1, j1]
                    r[0, 0], r[1, 0], r[2, 0], r[3, 0] = g00, g00 + g10, g00 - g10, -g10  # A dY
                    r[0, 1], r[1, 1], r[2, 1], r[3, 1] = g01, g01 + g11, g01 - g11, -g11
                    p = (n * TR + tr) * TC + tc
                    for a in range(4):  # · Aᵀ
                        left, right = r[a, 0], r[a, 1]
                        dM[4 * a + 0, k, p] = left
                        dM[4 * a + 1, k, p] = left + right
                        dM[4 * a + 2, k, p] = left - right
                        dM[4 * a + 3, k, p] = -right


def _weight_transform_adjoint(dU, dw):
    # dw[k, c] = Gᵀ dU[k, c] G: the transpose of _weight_transform
    K, C = dw.shape[0], dw.shape[1]
    for k in prange(K):
        t = np.empty((3, 4), dU.dtype)
        for c in range(C):
            for b in range(4):  # Gᵀ ·: rows (1 ½ ½ 0), (0 ½ −½ 0), (0 ½ ½ 1)
                u0, u1, u2, u3 = dU[b, k, c], dU[4 + b, k, c], dU[8 + b, k, c], \
                    dU[12 + b, k, c]
                t[0, b], t[1, b], t[2, b] = u0 + (u1 + u2) / 2, (u1 - u2) / 2, \
                    (u1 + u2) / 2 + u3
            for a in range(3):  # · G
                t0, t1, t2, t3 = t[a, 0], t[a, 1], t[a, 2], t[a, 3]
                dw[k, c, a, 0] = t0 + (t1 + t2) / 2
                dw[k, c, a, 1] = (t1 - t2) / 2
                dw[k, c, a, 2] = (t1 + t2) / 2 + t3


_output_transform_adjoint_cpu = parallel_njit(_output_transform_adjoint)
_weight_transform_adjoint_cpu = parallel_njit(_weight_transform_adjoint)


def weight_gradient(x, dy, padding, dilation, budget, buffer=_fresh):
    """dw (K, C, 3, 3): the exact gradient of the Winograd forward, which is the convolution.
    Forward: Y = Aᵀ (U ⊙ V) A with U = G w Gᵀ; backward: dM = A dY Aᵀ per tile,
    dU[e] = dM[e] · V[e]ᵀ (16 GEMMs, K × P × C, like the forward's), dw = Gᵀ dU G."""
    C = x.shape[1]
    K, Ho, Wo = dy.shape[1:]
    dh, dw_ = dilation
    rows, cols = tile_origins(Ho, dh), tile_origins(Wo, dw_)
    dU = np.zeros((16, K, C), x.dtype)
    for n0, n1, V in _input_tiles(x, K, rows, cols, padding, dilation, budget, buffer):
        dM = buffer("winograd_M", (16, K, V.shape[2]), x.dtype)
        _output_transform_adjoint_cpu(np.ascontiguousarray(dy[n0:n1]), dM, rows, cols, dh, dw_)
        dU += np.matmul(dM, V.transpose(0, 2, 1))  # 16 GEMMs
    dw = np.empty((K, C, 3, 3), x.dtype)
    _weight_transform_adjoint_cpu(dU, dw)
    return dw


def input_gradient(w, dy, x_shape, padding, dilation, budget, buffer=_fresh):
    """dx: the convolution of dy with the kernel flipped in space and K, C swapped."""
    (ph, pw), (dh, dw) = padding, dilation
    w_flip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    dx = forward(dy, w_flip, None, (2 * dh - ph, 2 * dw - pw), dilation, budget, buffer)
    assert dx.shape == tuple(x_shape)
    return dx
