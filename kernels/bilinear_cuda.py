"""CUDA version of ``bilinear`` (the tables and the math are in that module)."""
from ._cuda import cuda

from tinydeeplab.backend import array_module

from ._common import launch

from .bilinear import _tables


@cuda.jit
def _forward_kernel(x, y, h0, h1, hw0, hw1, v0, v1, vw0, vw1):
    t = cuda.grid(1)
    N, C, Ho, Wo = y.shape
    if t >= N * C * Ho * Wo:
        return
    j, i, c, n = t % Wo, (t // Wo) % Ho, (t // (Wo * Ho)) % C, t // (Wo * Ho * C)
    a, b, p, q = h0[i], h1[i], v0[j], v1[j]
    y[n, c, i, j] = (hw0[i] * (vw0[j] * x[n, c, a, p] + vw1[j] * x[n, c, a, q])
                     + hw1[i] * (vw0[j] * x[n, c, b, p] + vw1[j] * x[n, c, b, q]))


@cuda.jit
def _backward_kernel(dy, dx, hs, hr, hw, vs, vr, vw):
    t = cuda.grid(1)
    N, C, H, W = dx.shape
    if t >= N * C * H * W:
        return
    v, h, c, n = t % W, (t // W) % H, (t // (W * H)) % C, t // (W * H * C)
    acc = 0.0
    for e in range(hs[h], hs[h + 1]):
        row = 0.0
        for f in range(vs[v], vs[v + 1]):
            row += vw[f] * dy[n, c, hr[e], vr[f]]
        acc += hw[e] * row
    dx[n, c, h, v] = acc


def forward(x, size, align_corners):
    xp = array_module(x)
    fh, _, fw, _ = _tables(x.shape[2:], size, align_corners, x.dtype, xp)
    y = xp.empty(x.shape[:2] + tuple(size), dtype=x.dtype)
    launch(_forward_kernel, y.size, x, y, *fh, *fw)
    return y


def backward(dy, x_shape, align_corners):
    xp = array_module(dy)
    _, bh, _, bw = _tables(x_shape[2:], dy.shape[2:], align_corners, dy.dtype, xp)
    dx = xp.empty(x_shape, dtype=dy.dtype)
    launch(_backward_kernel, dx.size, dy, dx, *bh, *bw)
    return dx
