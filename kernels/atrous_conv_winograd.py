"""Winograd F(2×2, 3×3) for dilated 3×3 convolutions, stride 1 (the CPU ladder's ``cpu_v4`` and
``cpu_v5``).

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
gradient is the forward's adjoint (dM = A dY Aᵀ per tile, dU[e] = dM[e] · V[e]ᵀ, dw = Gᵀ dU G).
The transforms add rounding: float32 results differ from the float64 reference by a few 1e-6
relative — like a GEMM's different summation order, checked by the same tests.

Ladder: ``winograd_reference`` (NumPy, float64, the formulas above written out; ``m=4`` for
F(4×4)) → the Numba transforms, one number at a time, parallel over channels, with the GEMMs in
BLAS (cpu_v4) → the same transforms with the channels last, in SIMD over channels (cpu_v5, the
last section; its driver functions take ``m=4`` for F(4×4, 3×3), cpu_v6, whose transforms are
in atrous_conv_winograd4).  The channels-last drivers hand their 16 or 36 GEMMs to
``_gemm_batch.matmul_batch``: a share of the batch per thread, BLAS on one thread in each.
"""
from collections import namedtuple

import numpy as np
from numba import njit, prange

from . import parallel_njit
from ._gemm_batch import matmul_batch

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)


def tile_origins(n_out, d, m=2):
    """First output index of every m-output tile along one axis: a + m·d·t for each residue
    a."""
    return np.array([i for a in range(min(d, n_out)) for i in range(a, n_out, m * d)],
                    np.int64)


def applies(w_shape, stride):
    """Whether cpu_v4 computes this convolution by Winograd (else by cpu_v3's lowering)."""
    return tuple(w_shape[2:]) == (3, 3) and tuple(stride) == (1, 1)


def _weight_transform(w, U, flip):
    # U[4a + b, k, c] = (G w[k, c] Gᵀ)[a, b], G's rows (1 0 0), (½ ½ ½), (½ −½ ½), (0 0 1);
    # with ``flip``, of w[k, c] turned by 180° (w[k, c, 2 − p, 2 − q]), read in place
    K, C = w.shape[0], w.shape[1]
    first, last = (2, 0) if flip else (0, 2)
    for k in prange(K):
        t = np.empty((4, 3), w.dtype)
        for c in range(C):
            for q in range(3):  # G w: the rows of w combined
                qq = 2 - q if flip else q
                w0, w1, w2 = w[k, c, first, qq], w[k, c, 1, qq], w[k, c, last, qq]
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
    _weight_transform_cpu(w, U, False)
    return U


# ---- the reference: the formulas written out in NumPy, float64 --------------------------------
def winograd_reference(x, w, b, padding, dilation, m=2):
    """y of the dilated 3×3 convolution (stride 1) by F(m×m, 3×3), m = 2 or 4, in float64."""
    N, C, H, W = x.shape
    K = w.shape[0]
    (ph, pw), (dh, dw) = padding, dilation
    bt, g, at = _kernels(m).matrices
    Ho, Wo = H + 2 * ph - 2 * dh, W + 2 * pw - 2 * dw
    rows, cols = tile_origins(Ho, dh, m), tile_origins(Wo, dw, m)
    # zero padding, and room for the last tile (m + 2 inputs from its origin)
    xp = np.zeros((N, C, H + 2 * ph + (m + 1) * dh, W + 2 * pw + (m + 1) * dw))
    xp[:, :, ph:ph + H, pw:pw + W] = x
    U = np.einsum("ap,kcpq,bq->abkc", g, w, g)  # G w Gᵀ for every (k, c)
    y = np.zeros((N, K, Ho, Wo))
    for i0 in rows:
        for j0 in cols:
            tile = xp[:, :, i0:i0 + (m + 2) * dh:dh, j0:j0 + (m + 2) * dw:dw]  # (N, C, m+2, ·)
            V = np.einsum("au,ncuv,bv->abnc", bt, tile, bt)  # Bᵀ X B
            M = np.einsum("abkc,abnc->abnk", U, V)  # the (m+2)² products, summed over c
            out = np.einsum("sa,abnk,tb->nkst", at, M, at)  # Aᵀ M A: (N, K, m, m)
            for s in range(m):
                for t in range(m):
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


# ---- the channels-last rung (cpu_v5): the same arithmetic, vectorised over channels ---------
#
# cpu_v4's transforms handle one number at a time: a tile's 16 inputs lie d apart in a plane,
# its 16 outputs go to 16 different planes, and the loops are too short and too scattered for
# the compiler's vector instructions.  With the channels last — the images as (N, H, W, C),
# V as (16, tiles, C), M as (16, tiles, K) — each of those numbers becomes a run of C numbers
# side by side in memory, and every transform is an inner loop over channels that compiles
# to SIMD instructions.  Each value is computed by the same additions in the same order as in
# cpu_v4 (V and Y from M bit for bit); the GEMMs become M[e] = V[e] · U[e]ᵀ, the same products
# with the matrices' roles transposed.  The price is one transposing copy of the input (with
# the zero padding written in, so the tile loops need no bounds tests: a quarter of what the
# input transform writes) and one of each output row.

# STAGING: a tile row's output (or dy's) rows are staged channels last and copied to or from
# the planes one channel at a time, reading (writing) the staging buffer K + 16 numbers apart.
# Without the 16, rows of 512 channels lie 2 KB apart, and every 32nd cache set takes all of
# them: the copy of a 512-channel tile row then ran 4× slower (1 × 512 × 41², d = 4).
@njit(inline="always")
def _unstage_rows(out, y, n, i0, dh):
    # y[n, k, i0 + s·dh, :] = out[s, :, k] for the staged rows s that lie inside the map
    K, Ho, Wo = y.shape[1:]
    for s in range(min(out.shape[0], (Ho - 1 - i0) // dh + 1)):
        for k in range(K):
            for j in range(Wo):
                y[n, k, i0 + s * dh, j] = out[s, j, k]


@njit(inline="always")
def _stage_rows(dy, g, n, i0, dh):
    # g[s, :, k] = dy[n, k, i0 + s·dh, :], the transpose of _unstage_rows
    K, Ho, Wo = dy.shape[1:]
    for s in range(min(g.shape[0], (Ho - 1 - i0) // dh + 1)):
        for k in range(K):
            for j in range(Wo):
                g[s, j, k] = dy[n, k, i0 + s * dh, j]


@njit(cache=True)
def _transpose(src, dst):
    # dst[j, c] = src[c, j], 16 rows of src at a time: each row of dst then gets 16 numbers
    # side by side (a cache line) per visit; 0.3-0.8× the time of copying one number at a
    # time on bench_conv's 3×3 layers.
    C, W = src.shape
    whole = C - C % 16
    for c0 in range(0, whole, 16):
        for j in range(W):
            for c in range(16):
                dst[j, c0 + c] = src[c0 + c, j]
    for j in range(W):
        for c in range(whole, C):
            dst[j, c] = src[c, j]


def _padded_channels_last(x, xh, ph, pw):
    # xh[n, ph + h, pw + q, c] = x[n, c, h, q]; zero around it (padding, room for the last tile)
    N, C, H, W = x.shape
    Hp, Wp = xh.shape[1], xh.shape[2]
    for r in prange(N * Hp):
        n, i = r // Hp, r % Hp
        h = i - ph
        if 0 <= h < H:
            xh[n, i, :pw] = 0
            xh[n, i, pw + W:] = 0
            _transpose(x[n, :, h, :], xh[n, i, pw:pw + W, :])
        else:
            xh[n, i] = 0


def _input_transform_cl(xh, V, rows, cols, dh, dw):
    # V[e, p, c] = (Bᵀ X B)[e] for tile p = (n, tr, tc): cpu_v4's arithmetic, c innermost
    N, C = xh.shape[0], xh.shape[3]
    TR, TC = rows.shape[0], cols.shape[0]
    for r in prange(N * TR):
        n, i0 = r // TR, rows[r % TR]
        i1, i2, i3 = i0 + dh, i0 + 2 * dh, i0 + 3 * dh
        for tc in range(TC):
            j0 = cols[tc]
            j1, j2, j3 = j0 + dw, j0 + 2 * dw, j0 + 3 * dw
            p = r * TC + tc
            for c in range(C):
                x00, x01, x02, x03 = xh[n, i0, j0, c], xh[n, i0, j1, c], xh[n, i0, j2, c], \
                    xh[n, i0, j3, c]
                x10, x11, x12, x13 = xh[n, i1, j0, c], xh[n, i1, j1, c], xh[n, i1, j2, c], \
                    xh[n, i1, j3, c]
                x20, x21, x22, x23 = xh[n, i2, j0, c], xh[n, i2, j1, c], xh[n, i2, j2, c], \
                    xh[n, i2, j3, c]
                x30, x31, x32, x33 = xh[n, i3, j0, c], xh[n, i3, j1, c], xh[n, i3, j2, c], \
                    xh[n, i3, j3, c]
                # Bᵀ along the rows, column by column
                b00, b01, b02, b03 = x00 - x20, x01 - x21, x02 - x22, x03 - x23
                b10, b11, b12, b13 = x10 + x20, x11 + x21, x12 + x22, x13 + x23
                b20, b21, b22, b23 = x20 - x10, x21 - x11, x22 - x12, x23 - x13
                b30, b31, b32, b33 = x10 - x30, x11 - x31, x12 - x32, x13 - x33
                # then B along the columns
                V[0, p, c], V[1, p, c] = b00 - b02, b01 + b02
                V[2, p, c], V[3, p, c] = b02 - b01, b01 - b03
                V[4, p, c], V[5, p, c] = b10 - b12, b11 + b12
                V[6, p, c], V[7, p, c] = b12 - b11, b11 - b13
                V[8, p, c], V[9, p, c] = b20 - b22, b21 + b22
                V[10, p, c], V[11, p, c] = b22 - b21, b21 - b23
                V[12, p, c], V[13, p, c] = b30 - b32, b31 + b32
                V[14, p, c], V[15, p, c] = b32 - b31, b31 - b33


def _output_transform_cl(M, y, rows, cols, dh, dw):
    # y[n, k, i0 + s·dh, j0 + t·dw] = (Aᵀ M A)[s, t]: a tile row's two output rows are made
    # channels last in ``out``, then copied into y's planes
    N, K, Ho, Wo = y.shape
    TR, TC = rows.shape[0], cols.shape[0]
    for r in prange(N * TR):
        n, i0 = r // TR, rows[r % TR]
        out = np.empty((2, Wo + dw, K + 16), y.dtype)  # rows K + 16 long: see STAGING
        for tc in range(TC):
            j0 = cols[tc]
            j1 = j0 + dw
            p = r * TC + tc
            for k in range(K):
                m00, m01, m02, m03 = M[0, p, k], M[1, p, k], M[2, p, k], M[3, p, k]
                m10, m11, m12, m13 = M[4, p, k], M[5, p, k], M[6, p, k], M[7, p, k]
                m20, m21, m22, m23 = M[8, p, k], M[9, p, k], M[10, p, k], M[11, p, k]
                m30, m31, m32, m33 = M[12, p, k], M[13, p, k], M[14, p, k], M[15, p, k]
                r0, r1 = m00 + m10 + m20, m01 + m11 + m21  # Aᵀ M: two rows, per column
                r2, r3 = m02 + m12 + m22, m03 + m13 + m23
                s0, s1 = m10 - m20 - m30, m11 - m21 - m31
                s2, s3 = m12 - m22 - m32, m13 - m23 - m33
                out[0, j0, k], out[0, j1, k] = r0 + r1 + r2, r1 - r2 - r3  # then · A
                out[1, j0, k], out[1, j1, k] = s0 + s1 + s2, s1 - s2 - s3
        _unstage_rows(out, y, n, i0, dh)  # the second row may lie past the end


def _output_transform_adjoint_cl(dy, dM, rows, cols, dh, dw):
    # dM[e, p, k] = (A dY Aᵀ)[e]: the transpose of _output_transform_cl, dy's two rows of a
    # tile row made channels last (zero past the edges) first
    N, K, Ho, Wo = dy.shape
    TR, TC = rows.shape[0], cols.shape[0]
    for r in prange(N * TR):
        n, i0 = r // TR, rows[r % TR]
        g = np.zeros((2, Wo + dw, K + 16), dy.dtype)  # see STAGING
        _stage_rows(dy, g, n, i0, dh)
        for tc in range(TC):
            j0 = cols[tc]
            j1 = j0 + dw
            p = r * TC + tc
            for k in range(K):
                g00, g01, g10, g11 = g[0, j0, k], g[0, j1, k], g[1, j0, k], g[1, j1, k]
                a0, a1, a2, a3 = g00, g00 + g10, g00 - g10, -g10  # A dY, first column
                b0, b1, b2, b3 = g01, g01 + g11, g01 - g11, -g11  # and second
                dM[0, p, k], dM[1, p, k], dM[2, p, k], dM[3, p, k] = a0, a0 + b0, a0 - b0, -b0
                dM[4, p, k], dM[5, p, k], dM[6, p, k], dM[7, p, k] = a1, a1 + b1, a1 - b1, -b1
                dM[8, p, k], dM[9, p, k], dM[10, p, k], dM[11, p, k] = a2, a2 + b2, a2 - b2, \
                    -b2
                dM[12, p, k], dM[13, p, k], dM[14, p, k], dM[15, p, k] = a3, a3 + b3, \
                    a3 - b3, -b3


_padded_channels_last_cpu = parallel_njit(_padded_channels_last)
_input_transform_cl_cpu = parallel_njit(_input_transform_cl)
_output_transform_cl_cpu = parallel_njit(_output_transform_cl)
_output_transform_adjoint_cl_cpu = parallel_njit(_output_transform_adjoint_cl)


def channels_last_bytes(C, K, Ho, Wo, dilation, itemsize, m=2):
    """Bytes of one image's buffers in the channels-last rungs (F(m×m, 3×3)): V, M and the
    padded copy."""
    (dh, dw) = dilation
    tiles = len(tile_origins(Ho, dh, m)) * len(tile_origins(Wo, dw, m))
    return ((m + 2) ** 2 * (C + K) * tiles +
            C * (Ho + (m + 1) * dh) * (Wo + (m + 1) * dw)) * itemsize


def _input_tiles_cl(x, K, Ho, Wo, rows, cols, padding, dilation, budget, buffer, m):
    """Like _input_tiles, channels last: yields (n0, n1, V), V ((m + 2)², tiles, C)."""
    N, C = x.shape[:2]
    (ph, pw), (dh, dw) = padding, dilation
    step = max(1, min(N, budget // channels_last_bytes(C, K, Ho, Wo, dilation, x.itemsize, m)))
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        xh = buffer("winograd_xh", (n1 - n0, Ho + (m + 1) * dh, Wo + (m + 1) * dw, C), x.dtype)
        _padded_channels_last_cpu(x[n0:n1], xh, ph, pw)
        V = buffer("winograd_V", ((m + 2) ** 2, (n1 - n0) * rows.shape[0] * cols.shape[0], C),
                   x.dtype)
        _kernels(m).input(xh, V, rows, cols, dh, dw)
        yield n0, n1, V


def forward_cl(x, w, b, padding, dilation, budget, buffer=_fresh, m=2):
    """``forward`` with the channels last: M[e] = V[e] · U[e]ᵀ as (tiles, K) matrices; by
    F(m×m, 3×3), m = 2 (cpu_v5) or 4 (cpu_v6)."""
    U = buffer("winograd_U", ((m + 2) ** 2, w.shape[0], w.shape[1]), x.dtype)
    _kernels(m).weight(w.astype(x.dtype, copy=False), U, False)
    return _forward_cl(x, U.transpose(0, 2, 1), b, padding, dilation, budget, buffer, m)


def _forward_cl(x, UT, b, padding, dilation, budget, buffer, m):
    # forward_cl from UT ((m + 2)², C, K), the transformed kernel with its channel axes swapped
    N, C, H, W = x.shape
    K = UT.shape[2]
    (ph, pw), (dh, dw) = padding, dilation
    Ho, Wo = H + 2 * ph - 2 * dh, W + 2 * pw - 2 * dw
    rows, cols = tile_origins(Ho, dh, m), tile_origins(Wo, dw, m)
    y = np.empty((N, K, Ho, Wo), x.dtype)
    for n0, n1, V in _input_tiles_cl(x, K, Ho, Wo, rows, cols, padding, dilation, budget,
                                     buffer, m):
        M = buffer("winograd_M", (V.shape[0], V.shape[1], K), x.dtype)
        matmul_batch(V, UT, M)  # 16 (or 36) GEMMs
        _kernels(m).output(M, y[n0:n1], rows, cols, dh, dw)
    if b is not None:
        y += b.reshape(1, K, 1, 1)
    return y


def weight_gradient_cl(x, dy, padding, dilation, budget, buffer=_fresh, m=2):
    """``weight_gradient`` with the channels last: dU[e] = dM[e]ᵀ · V[e]."""
    C = x.shape[1]
    K, Ho, Wo = dy.shape[1:]
    dh, dw_ = dilation
    rows, cols = tile_origins(Ho, dh, m), tile_origins(Wo, dw_, m)
    dU = buffer("winograd_dU", ((m + 2) ** 2, K, C), x.dtype)
    first = True
    for n0, n1, V in _input_tiles_cl(x, K, Ho, Wo, rows, cols, padding, dilation, budget,
                                     buffer, m):
        dM = buffer("winograd_M", (V.shape[0], V.shape[1], K), x.dtype)
        _kernels(m).output_adjoint(dy[n0:n1], dM, rows, cols, dh, dw_)
        if first:
            matmul_batch(dM.transpose(0, 2, 1), V, dU)  # 16 (or 36) GEMMs
            first = False
        else:
            dU += matmul_batch(dM.transpose(0, 2, 1), V, np.empty_like(dU))
    dw = np.empty((K, C, 3, 3), x.dtype)
    _kernels(m).weight_adjoint(dU, dw)
    return dw


def input_gradient_cl(w, dy, x_shape, padding, dilation, budget, buffer=_fresh, m=2):
    """``input_gradient`` by the channels-last forward.  The flipped kernel's U, with K and C
    swapped, is what its GEMMs take as U[e]ᵀ: the transform of each w[k, c] turned by 180°,
    written in w's own (k, c) order (no transposed reads)."""
    (ph, pw), (dh, dw) = padding, dilation
    UT = buffer("winograd_U", ((m + 2) ** 2, w.shape[0], w.shape[1]), dy.dtype)
    _kernels(m).weight(w.astype(dy.dtype, copy=False), UT, True)
    dx = _forward_cl(dy, UT, None, (2 * dh - ph, 2 * dw - pw), dilation, budget, buffer, m)
    assert dx.shape == tuple(x_shape)
    return dx


# The channels-last kernels of each tile size
_Kernels = namedtuple("_Kernels", "input output output_adjoint weight weight_adjoint "
                                   "matrices")
_CL2 = _Kernels(_input_transform_cl_cpu, _output_transform_cl_cpu,
                _output_transform_adjoint_cl_cpu, _weight_transform_cpu,
                _weight_transform_adjoint_cpu, (BT, G, AT))


def _kernels(m):
    """The channels-last kernels of F(m×m, 3×3): this module's for m = 2, those of
    atrous_conv_winograd4 (cpu_v6) for m = 4."""
    if m == 2:
        return _CL2
    if m != 4:
        raise ValueError(f"Winograd: m (outputs per tile side) must be 2 or 4, got {m!r}")
    from . import atrous_conv_winograd4  # imported on first use: it builds on this module

    return atrous_conv_winograd4.KERNELS
