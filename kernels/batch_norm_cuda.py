"""CUDA version of ``batch_norm`` (the math is in that module's docstring).

Per-channel sums run one block per channel: each thread adds a strided share of the channel's
N·H·W values, then the block halves its partial sums in shared memory until one is left
(a tree reduction: log2(THREADS) steps, no atomics, the same order every run).
"""
import math

import numba
import numpy as np
from ._cuda import cuda

from tinydeeplab.backend import array_module

from ._common import THREADS, launch  # THREADS: a power of two, for the tree


@cuda.jit(device=True)
def _block_sum(shared, value):
    t = cuda.threadIdx.x
    shared[t] = value
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:
        if t < step:
            shared[t] += shared[t + step]
        cuda.syncthreads()
        step //= 2
    total = shared[0]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def _nchw(t, shape):
    """The (n, c, h, w) position of flat element t of a C-contiguous (N, C, H, W) array."""
    _, C, H, W = shape
    return t // (C * H * W), (t // (H * W)) % C, (t // W) % H, t % W


@cuda.jit
def _stats_kernel(x, mean, invstd, eps):
    c = cuda.blockIdx.x
    N, C, H, W = x.shape
    HW = H * W
    m = N * HW
    shared = cuda.shared.array(THREADS, numba.float64)
    s = 0.0
    for e in range(cuda.threadIdx.x, m, THREADS):
        s += x[e // HW, c, (e % HW) // W, e % W]
    mu = _block_sum(shared, s) / m
    ss = 0.0
    for e in range(cuda.threadIdx.x, m, THREADS):
        d = x[e // HW, c, (e % HW) // W, e % W] - mu
        ss += d * d
    var = _block_sum(shared, ss) / m
    if cuda.threadIdx.x == 0:
        mean[c] = mu
        invstd[c] = 1.0 / math.sqrt(var + eps)


@cuda.jit
def _normalize_kernel(x, mean, invstd, weight, bias, relu, y):
    t = cuda.grid(1)
    if t >= x.size:
        return
    n, c, h, w_ = _nchw(t, x.shape)
    scale = weight[c] * invstd[c]
    v = x[n, c, h, w_] * scale + (bias[c] - mean[c] * scale)
    y[n, c, h, w_] = max(v, 0.0) if relu else v


@cuda.jit
def _normalize_add_kernel(x, mean, invstd, weight, bias, residual, relu, y):
    # relu(bn(x) + residual), rounding as the separate operations do (see batch_norm.py)
    t = cuda.grid(1)
    if t >= x.size:
        return
    n, c, h, w_ = _nchw(t, x.shape)
    scale = weight[c] * invstd[c]
    y[n, c, h, w_] = x[n, c, h, w_] * scale + (bias[c] - mean[c] * scale)
    s = y[n, c, h, w_] + residual[n, c, h, w_]
    y[n, c, h, w_] = s if not relu or s > 0 else s * 0


@cuda.jit
def _after_relu_kernel(dy, y, g):
    # g = dy·[y > 0], ReLU's backward as ops.relu computes it
    t = cuda.grid(1)
    if t >= y.size:
        return
    n, c, h, w_ = _nchw(t, y.shape)
    g[n, c, h, w_] = dy[n, c, h, w_] if y[n, c, h, w_] > 0 else dy[n, c, h, w_] * 0


@cuda.jit
def _grad_params_kernel(dy, x, y, mean, invstd, relu, dweight, dbias):
    c = cuda.blockIdx.x
    N, C, H, W = x.shape
    HW = H * W
    shared = cuda.shared.array(THREADS, numba.float64)
    sb = 0.0
    sw = 0.0
    for e in range(cuda.threadIdx.x, N * HW, THREADS):
        n, h, w_ = e // HW, (e % HW) // W, e % W
        g = dy[n, c, h, w_]
        if relu and y[n, c, h, w_] <= 0:
            g = 0.0
        sb += g
        sw += g * (x[n, c, h, w_] - mean[c]) * invstd[c]
    total_b = _block_sum(shared, sb)
    total_w = _block_sum(shared, sw)
    if cuda.threadIdx.x == 0:
        dbias[c] = total_b
        dweight[c] = total_w


@cuda.jit
def _grad_input_kernel(dy, x, y, mean, invstd, weight, dweight, dbias, training, relu, dx):
    t = cuda.grid(1)
    if t >= x.size:
        return
    n, c, h, w_ = _nchw(t, x.shape)
    m = x.size // x.shape[1]  # values per channel
    g = dy[n, c, h, w_]
    if relu and y[n, c, h, w_] <= 0:
        g = 0.0
    if training:
        xhat = (x[n, c, h, w_] - mean[c]) * invstd[c]
        g = g - dbias[c] / m - xhat * dweight[c] / m
    dx[n, c, h, w_] = weight[c] * invstd[c] * g


def stats(x, eps):
    xp = array_module(x)
    C = x.shape[1]
    mean, invstd = xp.empty(C, np.float64), xp.empty(C, np.float64)
    _stats_kernel[C, THREADS](x, mean, invstd, eps)
    return mean, invstd


def forward(x, mean, invstd, weight, bias, relu):
    y = array_module(x).empty_like(x)
    launch(_normalize_kernel, x.size, x, mean, invstd, weight, bias, relu, y)
    return y


def backward(dy, x, y, mean, invstd, weight, training, relu):
    xp = array_module(x)
    C = x.shape[1]
    dweight, dbias = xp.empty(C, np.float64), xp.empty(C, np.float64)
    _grad_params_kernel[C, THREADS](dy, x, y, mean, invstd, relu, dweight, dbias)
    dx = xp.empty_like(x)
    launch(_grad_input_kernel, x.size, dy, x, y, mean, invstd, weight, dweight, dbias,
            training, relu, dx)
    return dx, dweight.astype(x.dtype), dbias.astype(x.dtype)


def forward_add(x, mean, invstd, weight, bias, relu, residual):
    y = array_module(x).empty_like(x)
    launch(_normalize_add_kernel, x.size, x, mean, invstd, weight, bias, residual, relu, y)
    return y


def backward_add(dy, x, y, mean, invstd, weight, training, relu):
    g = dy
    if relu:
        g = array_module(dy).empty_like(dy)
        launch(_after_relu_kernel, dy.size, dy, y, g)
    return (*backward(g, x, x, mean, invstd, weight, training, False), g)
