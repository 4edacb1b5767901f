"""CUDA version of ``max_pool`` (math and tie rule in that module's docstring)."""
from ._cuda import cuda

from tinydeeplab.backend import array_module

from ._common import launch


@cuda.jit
def _forward_kernel(x, y, argmax, kh, kw, sh, sw, ph, pw):
    t = cuda.grid(1)
    N, C, Ho, Wo = y.shape
    if t >= N * C * Ho * Wo:
        return
    j, i, c, n = t % Wo, (t // Wo) % Ho, (t // (Wo * Ho)) % C, t // (Wo * Ho * C)
    H, W = x.shape[2], x.shape[3]
    best = x[n, c, 0, 0]
    where = -1
    for p in range(kh):
        h = i * sh - ph + p
        if 0 <= h < H:
            for q in range(kw):
                v = j * sw - pw + q
                if 0 <= v < W and (where < 0 or x[n, c, h, v] > best):
                    best = x[n, c, h, v]
                    where = h * W + v
    y[n, c, i, j] = best
    argmax[n, c, i, j] = where


@cuda.jit
def _backward_kernel(dy, argmax, dx, kh, kw, sh, sw, ph, pw):
    # input element (h, v) lies in the windows i with i·s − pad ≤ h < i·s − pad + k
    t = cuda.grid(1)
    N, C, H, W = dx.shape
    if t >= N * C * H * W:
        return
    v, h, c, n = t % W, (t // W) % H, (t // (W * H)) % C, t // (W * H * C)
    Ho, Wo = dy.shape[2], dy.shape[3]
    i_lo = max(0, (h + ph - kh + sh) // sh)
    i_hi = min(Ho - 1, (h + ph) // sh)
    j_lo = max(0, (v + pw - kw + sw) // sw)
    j_hi = min(Wo - 1, (v + pw) // sw)
    me = h * W + v
    acc = 0.0
    for i in range(i_lo, i_hi + 1):
        for j in range(j_lo, j_hi + 1):
            if argmax[n, c, i, j] == me:
                acc += dy[n, c, i, j]
    dx[n, c, h, v] = acc


def forward(x, k, s, p, out_size):
    xp = array_module(x)
    y = xp.empty(x.shape[:2] + out_size, dtype=x.dtype)
    argmax = xp.empty(y.shape, dtype=xp.int32)
    launch(_forward_kernel, y.size, x, y, argmax, *k, *s, *p)
    return y, argmax


def backward(dy, argmax, x_shape, k, s, p):
    xp = array_module(dy)
    dx = xp.empty(x_shape, dtype=dy.dtype)
    launch(_backward_kernel, dx.size, dy, argmax, dx, *k, *s, *p)
    return dx
