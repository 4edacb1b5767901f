"""2-D max pooling, forward and backward (the ResNet stem: 3×3, stride 2, padding 1).

Shapes: x (N, C, H, W) -> y (N, C, Ho, Wo), plus ``argmax`` (N, C, Ho, Wo): the flat index
h·W + w, within its plane, of the input element each output took.

    y[n,c,i,j] = max_{p<kh, q<kw} x[n, c, i·s − pad + p, j·s − pad + q]   (padding is −∞)

Output size:  Ho = ⌊(H + 2·pad − kh) / s⌋ + 1, or with ``ceil_mode`` ⌈(H + 2·pad − kh) / s⌉ + 1,
minus one if that last window would start beyond the input and right padding (PyTorch's and
Caffe's rule, so a window always overlaps real pixels).  Windows scan rows then columns and
take the *first* maximum, as PyTorch does, so both pick the same element on ties.

Backward: the max is piecewise linear: dx[argmax[n,c,i,j]] += dy[n,c,i,j] (an element that wins
several overlapping windows collects all their gradients).  On the CPU each (n, c) plane is one
iteration, so the scatter-add cannot race; on CUDA each input element *gathers* from the
windows that contain it (no atomics, deterministic).

Variants: ``cpu_v1`` (Numba loops, parallel over planes), ``cpu_v2`` (the default: the same
answers, bit for bit, without data-dependent branches in the forward and with flat planes in
the backward) and ``cuda_v1`` (one thread per output for the forward, per input element for
the backward).
"""
from collections import namedtuple

import numpy as np
from numba import prange

from tinydeeplab.backend import array_module

from . import parallel_njit
from ._common import int_pair, lazy, pick

Variant = namedtuple("Variant", "device forward backward description")


def pooled_size(H, k, s, pad, ceil_mode):
    span = H + 2 * pad - k
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= H + pad:
        out -= 1
    return out


def check_pool_args(x, kernel_size, stride, padding, ceil_mode):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"max_pool2d: x must be 4-D (N, C, H, W), got shape {np.shape(x)}")
    k = int_pair(kernel_size, "kernel_size", 1, "max_pool2d")
    s = int_pair(k if stride is None else stride, "stride", 1, "max_pool2d")
    p = int_pair(padding, "padding", 0, "max_pool2d")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"max_pool2d: padding {p} must be at most half the kernel size {k}")
    H, W = x.shape[2], x.shape[3]
    Ho = pooled_size(H, k[0], s[0], p[0], ceil_mode)
    Wo = pooled_size(W, k[1], s[1], p[1], ceil_mode)
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"max_pool2d: input {x.shape} is smaller than the kernel {k} "
                         f"(padding {p}): output size {Ho}×{Wo}")
    return k, s, p, (Ho, Wo)


def _forward(x, y, argmax, kh, kw, sh, sw, ph, pw):
    N, C, H, W = x.shape
    Ho, Wo = y.shape[2], y.shape[3]
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for i in range(Ho):
            for j in range(Wo):
                best = -np.inf
                where = -1
                for p in range(kh):
                    h = i * sh - ph + p
                    if h < 0 or h >= H:
                        continue
                    for q in range(kw):
                        v = j * sw - pw + q
                        if 0 <= v < W and (x[n, c, h, v] > best or where < 0):
                            best = x[n, c, h, v]
                            where = h * W + v
                y[n, c, i, j] = best
                argmax[n, c, i, j] = where


def _backward(dy, argmax, dx):
    N, C, Ho, Wo = dy.shape
    H, W = dx.shape[2], dx.shape[3]
    for nc in prange(N * C):  # one plane per iteration: no two iterations touch one element
        n, c = nc // C, nc % C
        for h in range(H):  # zeroed here, not by np.zeros: see _cpu_backward
            for v in range(W):
                dx[n, c, h, v] = 0
        for i in range(Ho):
            for j in range(Wo):
                a = argmax[n, c, i, j]
                dx[n, c, a // W, a % W] += dy[n, c, i, j]


def _forward_v2(x, y, argmax, kh, kw, sh, sw, ph, pw):
    # cpu_v1's answer without its data-dependent branches.  ``if x > best`` is taken at
    # random on real activations, and each mispredicted branch costs more than the
    # comparison.  Here a window's maximum is a chain of selects (best = e if e > best),
    # which compile to max instructions, and its first position comes from a second scan,
    # backwards, with conditional moves: the first element equal to the maximum is the
    # one cpu_v1 keeps.  A NaN in the first place stays the answer, as in cpu_v1; NaNs
    # later in the window are passed over, as there.  3×3 windows inside the image (the
    # stem's pooling) are written out in full; the rest take the general loops.
    N, C, H, W = x.shape
    Ho, Wo = y.shape[2], y.shape[3]
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for i in range(Ho):
            h0 = i * sh - ph
            p0, p1 = max(0, -h0), min(kh, H - h0)
            for j in range(Wo):
                v0 = j * sw - pw
                q0, q1 = max(0, -v0), min(kw, W - v0)
                if kh == 3 and kw == 3 and p0 == 0 and p1 == 3 and q0 == 0 and q1 == 3:
                    a0, a1, a2 = x[n, c, h0, v0], x[n, c, h0, v0 + 1], x[n, c, h0, v0 + 2]
                    a3, a4, a5 = (x[n, c, h0 + 1, v0], x[n, c, h0 + 1, v0 + 1],
                                  x[n, c, h0 + 1, v0 + 2])
                    a6, a7, a8 = (x[n, c, h0 + 2, v0], x[n, c, h0 + 2, v0 + 1],
                                  x[n, c, h0 + 2, v0 + 2])
                    best = a0
                    best = a1 if a1 > best else best
                    best = a2 if a2 > best else best
                    best = a3 if a3 > best else best
                    best = a4 if a4 > best else best
                    best = a5 if a5 > best else best
                    best = a6 if a6 > best else best
                    best = a7 if a7 > best else best
                    best = a8 if a8 > best else best
                    k = 8 if a8 == best else 0  # 0 also when a0 is NaN (never == best)
                    k = 7 if a7 == best else k
                    k = 6 if a6 == best else k
                    k = 5 if a5 == best else k
                    k = 4 if a4 == best else k
                    k = 3 if a3 == best else k
                    k = 2 if a2 == best else k
                    k = 1 if a1 == best else k
                    k = 0 if a0 == best else k
                    y[n, c, i, j] = best
                    argmax[n, c, i, j] = (h0 + k // 3) * W + v0 + k % 3
                    continue
                best = x[n, c, h0 + p0, v0 + q0]
                for p in range(p0, p1):
                    for q in range(q0, q1):
                        e = x[n, c, h0 + p, v0 + q]
                        best = e if e > best else best
                where = (h0 + p0) * W + v0 + q0
                for p in range(p1 - 1, p0 - 1, -1):
                    for q in range(q1 - 1, q0 - 1, -1):
                        e = x[n, c, h0 + p, v0 + q]
                        where = (h0 + p) * W + v0 + q if e == best else where
                y[n, c, i, j] = best
                argmax[n, c, i, j] = where


def _backward_v2(dy, argmax, dx):
    # cpu_v1's scatter over each plane seen flat (dx as (N, C, H·W)): argmax is already the
    # flat position, so no division and remainder per element; the additions into each
    # element come in the same order, so the bits are the same
    N, C, Ho, Wo = dy.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for e in range(dx.shape[2]):
            dx[n, c, e] = 0
        for i in range(Ho):
            for j in range(Wo):
                dx[n, c, argmax[n, c, i, j]] += dy[n, c, i, j]


_forward_cpu = parallel_njit(_forward)
_forward_v2_cpu = parallel_njit(_forward_v2)
_backward_cpu = parallel_njit(_backward)
_backward_v2_cpu = parallel_njit(_backward_v2)


def _cpu_forward(x, k, s, p, out_size):
    y = np.empty(x.shape[:2] + out_size, dtype=x.dtype)
    argmax = np.empty(y.shape, dtype=np.int32)
    _forward_cpu(x, y, argmax, *k, *s, *p)
    return y, argmax


def _cpu_v2_forward(x, k, s, p, out_size):
    y = np.empty(x.shape[:2] + out_size, dtype=x.dtype)
    argmax = np.empty(y.shape, dtype=np.int32)
    _forward_v2_cpu(x, y, argmax, *k, *s, *p)
    return y, argmax


def _cpu_backward(dy, argmax, x_shape, k, s, p):
    # np.empty, zeroed plane by plane inside the parallel loop.  np.zeros of a large array
    # gets fresh pages from the OS (calloc skips the memset because new pages read as zero);
    # the scatter then faults them in from both threads at once.  Measured in the tiny
    # model's training step (stem 4 × 16 × 81², 2 cores): about 650 page faults and 3.4 ms,
    # against none and 0.16 ms this way, where malloc reuses memory the process holds.
    dx = np.empty(x_shape, dtype=dy.dtype)
    _backward_cpu(dy, argmax, dx)
    return dx


def _cpu_v2_backward(dy, argmax, x_shape, k, s, p):
    dx = np.empty(x_shape, dtype=dy.dtype)  # zeroed in the loop, as in _cpu_backward
    _backward_v2_cpu(dy, argmax, dx.reshape(x_shape[0], x_shape[1], -1))
    return dx


VARIANTS = {
    "cpu_v1": Variant("cpu", _cpu_forward, _cpu_backward, "Numba loops, parallel over planes"),
    "cpu_v2": Variant("cpu", _cpu_v2_forward, _cpu_v2_backward,
                      "cpu_v1's answers without data-dependent branches (3×3 written out); "
                      "the backward over flat planes"),
    "cuda_v1": Variant("cuda", lazy("max_pool_cuda", "forward"),
                       lazy("max_pool_cuda", "backward"),
                       "one thread per output (forward) / per input element (backward)"),
}
DEFAULT = {"cpu": "cpu_v2", "cuda": "cuda_v1"}


def max_pool2d_forward(x, kernel_size, stride=None, padding=0, ceil_mode=False, variant=None):
    """(y, argmax) on arrays; stride defaults to the kernel size."""
    k, s, p, out_size = check_pool_args(x, kernel_size, stride, padding, ceil_mode)
    x = array_module(x).ascontiguousarray(x)
    return pick(VARIANTS, DEFAULT, x, variant).forward(x, k, s, p, out_size)


def max_pool2d_backward(dy, argmax, x_shape, kernel_size, stride=None, padding=0,
                        variant=None):
    """dx of shape x_shape from dy and the forward's argmax."""
    k = int_pair(kernel_size, "kernel_size", 1, "max_pool2d")
    s = int_pair(k if stride is None else stride, "stride", 1, "max_pool2d")
    p = int_pair(padding, "padding", 0, "max_pool2d")
    if dy.shape != argmax.shape:
        raise ValueError(f"max_pool2d_backward: dy {dy.shape} and argmax {argmax.shape} differ")
    dy = array_module(dy).ascontiguousarray(dy)
    impl = pick(VARIANTS, DEFAULT, dy, variant)
    return impl.backward(dy, argmax, tuple(x_shape), k, s, p)
