"""Batch normalisation over (N, H, W) per channel, forward and backward, optionally fused with
the ReLU that follows it in every ResNet block.

Shapes: x, y (N, C, H, W); weight γ, bias β, running_mean, running_var (C,).  With
m = N·H·W values per channel:

    training:   μ = mean(x),  σ² = mean((x − μ)²)  (biased), and the running statistics move
                r_μ ← (1 − momentum)·r_μ + momentum·μ,  r_σ² ← … + momentum·σ²·m/(m − 1)
    inference:  μ, σ² = r_μ, r_σ²  (DeepLab's frozen batch norm: these and γ, β stay fixed)
    x̂ = (x − μ) / √(σ² + eps),   y = γ·x̂ + β,   and with ``relu``: y = max(γ·x̂ + β, 0)

A ResNet block ends in relu(bn(x) + shortcut).  With ``residual`` (the shortcut) the forward
does all three in one pass and the backward returns the shortcut's gradient (dy masked by
y > 0) too, rounding at each step as the separate operations do: the same bits, with two
fewer passes over the activations each way.  cpu_v3 and cuda_v1 have this in their own
kernels; cpu_v1 and cpu_v2 compose their forward and backward with array operations.

Backward (dy already masked by y > 0 when fused with ReLU):

    dβ = Σ dy,   dγ = Σ dy·x̂
    inference:  dx = γ/√(σ² + eps) · dy
    training:   dx = γ/√(σ² + eps) · (dy − dβ/m − x̂·dγ/m)      (μ and σ² depend on x)

The CPU kernels run one channel per iteration (reductions in float64, two passes for the
variance); the CUDA ones use one block per channel for the reductions and one thread per
element for the elementwise parts.  Variants, the ladder:

- ``cpu_v1``: the plain loops above, a channel per iteration for the sums, a plane for the rest.
- ``cpu_v3`` (the default): cpu_v1's arithmetic bit for bit, four channels' sums side by side
  and the ReLU mask as its own pass (the rung after cpu_v1).
- ``cpu_v2``: sums reassociated into SIMD accumulators, the fastest, but its results differ
  from cpu_v1's in the last bits (see the note at ``DEFAULT``).
- ``cuda_v1``.
"""
from collections import namedtuple

import numpy as np
from numba import prange

from tinydeeplab.backend import array_module

from . import parallel_njit
from ._common import lazy, pick

def _stats(x, mean, invstd, eps):
    N, C, H, W = x.shape
    m = N * H * W
    for c in prange(C):
        s = 0.0
        for n in range(N):
            for h in range(H):
                for w in range(W):
                    s += x[n, c, h, w]
        mu = s / m
        ss = 0.0
        for n in range(N):
            for h in range(H):
                for w in range(W):
                    d = x[n, c, h, w] - mu
                    ss += d * d
        mean[c] = mu
        invstd[c] = 1.0 / np.sqrt(ss / m + eps)


def _normalize(x, mean, invstd, weight, bias, relu, y):
    N, C, H, W = x.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        scale = weight[c] * invstd[c]
        shift = bias[c] - mean[c] * scale
        for h in range(H):
            for w in range(W):
                v = x[n, c, h, w] * scale + shift
                y[n, c, h, w] = max(v, 0.0) if relu else v


def _grad_params(dy, x, y, mean, invstd, relu, dweight, dbias):
    N, C, H, W = x.shape
    for c in prange(C):
        sb = 0.0
        sw = 0.0
        for n in range(N):
            for h in range(H):
                for w in range(W):
                    g = dy[n, c, h, w]
                    if relu and y[n, c, h, w] <= 0:
                        g = 0.0
                    sb += g
                    sw += g * (x[n, c, h, w] - mean[c]) * invstd[c]
        dbias[c] = sb
        dweight[c] = sw


def _grad_input(dy, x, y, mean, invstd, weight, dweight, dbias, training, relu, dx):
    N, C, H, W = x.shape
    m = N * H * W
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        k = weight[c] * invstd[c]
        for h in range(H):
            for w in range(W):
                g = dy[n, c, h, w]
                if relu and y[n, c, h, w] <= 0:
                    g = 0.0
                if training:
                    xhat = (x[n, c, h, w] - mean[c]) * invstd[c]
                    g = g - dbias[c] / m - xhat * dweight[c] / m
                dx[n, c, h, w] = k * g


_stats_cpu = parallel_njit(_stats)
_normalize_cpu = parallel_njit(_normalize)
_grad_params_cpu = parallel_njit(_grad_params)
_grad_input_cpu = parallel_njit(_grad_input)


def _cpu_forward(x, mean, invstd, weight, bias, relu):
    y = np.empty_like(x)
    _normalize_cpu(x, mean, invstd, weight, bias, relu, y)
    return y


def _cpu_stats(x, eps):
    C = x.shape[1]
    mean, invstd = np.empty(C, np.float64), np.empty(C, np.float64)
    _stats_cpu(x, mean, invstd, eps)
    return mean, invstd


def _cpu_backward(dy, x, y, mean, invstd, weight, training, relu):
    C = x.shape[1]
    dweight, dbias = np.empty(C, np.float64), np.empty(C, np.float64)
    _grad_params_cpu(dy, x, y, mean, invstd, relu, dweight, dbias)
    dx = np.empty_like(x)
    _grad_input_cpu(dy, x, y, mean, invstd, weight, dweight, dbias, training, relu, dx)
    return dx, dweight.astype(x.dtype), dbias.astype(x.dtype)


# ---- cpu_v2: the same arithmetic over flat planes, sums reassociated ----------------------------
# v1's innermost loops run along one image row (21-81 values in the tiny model) and add into
# a single float64 accumulator: a chain of dependent additions the CPU cannot overlap, plus
# loop overhead per row.  v2 sees each (n, c) plane as one run of H·W values (x is passed as
# (N, C, H·W)) and lets the compiler reorder the sums (fastmath "reassoc"), so it keeps
# several SIMD accumulators.  Same formulas, same float64 sums; only the summation order
# differs (results agree with v1 to rounding, ~1e-7 relative).
def _stats_v2(x, mean, invstd, eps):
    N, C, P = x.shape
    m = N * P
    for c in prange(C):
        s = 0.0
        for n in range(N):
            for i in range(P):
                s += x[n, c, i]
        mu = s / m
        ss = 0.0
        for n in range(N):
            for i in range(P):
                d = x[n, c, i] - mu
                ss += d * d
        mean[c] = mu
        invstd[c] = 1.0 / np.sqrt(ss / m + eps)


def _normalize_v2(x, scale, shift, relu, y):
    # y = x·scale[c] + shift[c]  (scale = γ·invstd, shift = β − μ·scale, in x's dtype)
    N, C, P = x.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        if relu:
            for i in range(P):
                y[n, c, i] = max(x[n, c, i] * scale[c] + shift[c], 0)
        else:
            for i in range(P):
                y[n, c, i] = x[n, c, i] * scale[c] + shift[c]


def _grad_params_v2(dy, x, y, mean, invstd, relu, dweight, dbias):
    N, C, P = x.shape
    for c in prange(C):
        sb = 0.0
        sx = 0.0
        for n in range(N):
            for i in range(P):
                g = dy[n, c, i]
                if relu and y[n, c, i] <= 0:
                    g = np.float32(0.0)
                sb += g
                sx += g * (x[n, c, i] - mean[c])
        dbias[c] = sb
        dweight[c] = sx * invstd[c]


def _grad_input_v2(dy, x, y, mu, a, b, e, relu, dx):
    # dx = a[c]·g + b[c]·(x − μ[c]) + e[c]: the training formula with per-channel
    # coefficients (in x's dtype, computed by the caller; b = e = 0 in inference)
    N, C, P = x.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for i in range(P):
            g = dy[n, c, i]
            if relu and y[n, c, i] <= 0:
                g = 0
            dx[n, c, i] = a[c] * g + b[c] * (x[n, c, i] - mu[c]) + e[c]


_REASSOC = {"reassoc", "nsz", "contract"}
_stats_v2_cpu = parallel_njit(_stats_v2, fastmath=_REASSOC)
_normalize_v2_cpu = parallel_njit(_normalize_v2, fastmath=_REASSOC)
_grad_params_v2_cpu = parallel_njit(_grad_params_v2, fastmath=_REASSOC)
_grad_input_v2_cpu = parallel_njit(_grad_input_v2, fastmath=_REASSOC)


def _flat(a):
    N, C = a.shape[:2]
    return a.reshape(N, C, -1)


def _cpu_v2_forward(x, mean, invstd, weight, bias, relu):
    y = np.empty_like(x)
    scale = weight * invstd
    shift = bias - mean * scale
    _normalize_v2_cpu(_flat(x), scale.astype(x.dtype), shift.astype(x.dtype), relu, _flat(y))
    return y


def _cpu_v2_stats(x, eps):
    C = x.shape[1]
    mean, invstd = np.empty(C, np.float64), np.empty(C, np.float64)
    _stats_v2_cpu(_flat(x), mean, invstd, eps)
    return mean, invstd


def _cpu_v2_backward(dy, x, y, mean, invstd, weight, training, relu):
    C = x.shape[1]
    dweight, dbias = np.empty(C, np.float64), np.empty(C, np.float64)
    _grad_params_v2_cpu(_flat(dy), _flat(x), _flat(y), mean, invstd, relu, dweight, dbias)
    m = x.size // C
    k = weight * invstd
    b = -k * invstd * dweight / m if training else np.zeros(C)  # dx = k·g + b·(x − μ) + e
    e = -k * dbias / m if training else np.zeros(C)
    dx = np.empty_like(x)
    dt = x.dtype
    _grad_input_v2_cpu(_flat(dy), _flat(x), _flat(y), mean.astype(dt), k.astype(dt),
                       b.astype(dt), e.astype(dt), relu, _flat(dx))
    return dx, dweight.astype(x.dtype), dbias.astype(x.dtype)


# ---- cpu_v3: cpu_v1's arithmetic, four channels' sums side by side ---------------------------
# A float64 sum in v1's order is a chain of dependent additions: each waits for the one before
# (several cycles), so one channel at a time leaves most of the CPU idle.  v3 keeps every
# channel's sum in v1's order but runs four channels' chains at once, in four accumulators:
# the additions of different channels do not wait for each other.  Same operations on the same
# values in the same order per channel, so the results are bit-identical to cpu_v1 (tested),
# which keeps every recorded training figure.  A group of channels past the last channel
# repeats the last one (its sums are computed twice, written with the same value).  The
# other loops run over flat planes, with the per-channel values read once per plane.
GROUP = 4  # channels summed side by side


def _stats_v3(x, mean, invstd, eps):
    N, C, P = x.shape
    m = N * P
    for group in prange((C + GROUP - 1) // GROUP):
        c0 = group * GROUP
        c1, c2, c3 = min(c0 + 1, C - 1), min(c0 + 2, C - 1), min(c0 + 3, C - 1)
        s0 = s1 = s2 = s3 = 0.0
        for n in range(N):
            for i in range(P):
                s0 += x[n, c0, i]
                s1 += x[n, c1, i]
                s2 += x[n, c2, i]
                s3 += x[n, c3, i]
        mu0, mu1, mu2, mu3 = s0 / m, s1 / m, s2 / m, s3 / m
        s0 = s1 = s2 = s3 = 0.0
        for n in range(N):
            for i in range(P):
                d0 = x[n, c0, i] - mu0
                d1 = x[n, c1, i] - mu1
                d2 = x[n, c2, i] - mu2
                d3 = x[n, c3, i] - mu3
                s0 += d0 * d0
                s1 += d1 * d1
                s2 += d2 * d2
                s3 += d3 * d3
        for c, mu, ss in ((c3, mu3, s3), (c2, mu2, s2), (c1, mu1, s1), (c0, mu0, s0)):
            mean[c] = mu
            invstd[c] = 1.0 / np.sqrt(ss / m + eps)


def _normalize_v3(x, mean, invstd, weight, bias, relu, y):
    N, C, P = x.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        scale = weight[c] * invstd[c]
        shift = bias[c] - mean[c] * scale
        for i in range(P):
            v = x[n, c, i] * scale + shift
            y[n, c, i] = max(v, 0.0) if relu else v


def _relu_mask_v3(dy, y, g):
    # g = dy where y > 0, else 0: v1's masked gradient, as its own pass.  Here the test
    # compiles to SIMD selects; inside the sums below it would be a branch per element that
    # the CPU mispredicts about half the time (ReLU's signs look random).
    N, C, P = y.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for i in range(P):
            g[n, c, i] = 0 if y[n, c, i] <= 0 else dy[n, c, i]


def _grad_params_v3(g, x, mean, invstd, dweight, dbias):
    N, C, P = x.shape
    for c in prange(C):  # one channel: its two sums are already two independent chains
        mu, k = mean[c], invstd[c]
        sb = 0.0
        sw = 0.0
        for n in range(N):
            for i in range(P):
                sb += g[n, c, i]
                sw += g[n, c, i] * (x[n, c, i] - mu) * k
        dbias[c] = sb
        dweight[c] = sw


def _grad_input_v3(g, x, mean, invstd, weight, dweight, dbias, training, dx):
    # g is the masked gradient; dx may be g itself (each element reads only its own)
    N, C, P = x.shape
    m = N * P
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        k = weight[c] * invstd[c]
        mu, s, dw = mean[c], invstd[c], dweight[c]
        db_m = dbias[c] / m  # v1 divides per element; the quotient is the same
        if training:
            for i in range(P):
                xhat = (x[n, c, i] - mu) * s
                dx[n, c, i] = k * (g[n, c, i] - db_m - xhat * dw / m)
        else:
            for i in range(P):
                dx[n, c, i] = k * g[n, c, i]


def _normalize_add_v3(x, mean, invstd, weight, bias, residual, relu, y):
    # A ResNet block's end, y = relu(bn(x) + residual), in one pass.  Each step rounds as the
    # separate operations do: bn(x) to y's dtype, then the addition in that dtype, then
    # ReLU as ops.relu computes it (s·[s > 0]), so the bits are the same.
    N, C, P = x.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        scale = weight[c] * invstd[c]
        shift = bias[c] - mean[c] * scale
        for i in range(P):
            y[n, c, i] = x[n, c, i] * scale + shift
            s = y[n, c, i] + residual[n, c, i]
            y[n, c, i] = s if not relu or s > 0 else s * 0


def _after_relu_v3(dy, y, g):
    # g = dy·[y > 0]: ReLU's backward as ops.relu computes it (a product, so a masked
    # element is dy·0, as there)
    N, C, P = y.shape
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for i in range(P):
            g[n, c, i] = dy[n, c, i] if y[n, c, i] > 0 else dy[n, c, i] * 0


_stats_v3_cpu = parallel_njit(_stats_v3)
_normalize_v3_cpu = parallel_njit(_normalize_v3)
_relu_mask_v3_cpu = parallel_njit(_relu_mask_v3)
_grad_params_v3_cpu = parallel_njit(_grad_params_v3)
_grad_input_v3_cpu = parallel_njit(_grad_input_v3)
_normalize_add_v3_cpu = parallel_njit(_normalize_add_v3)
_after_relu_v3_cpu = parallel_njit(_after_relu_v3)


def _cpu_v3_stats(x, eps):
    C = x.shape[1]
    mean, invstd = np.empty(C, np.float64), np.empty(C, np.float64)
    _stats_v3_cpu(_flat(x), mean, invstd, eps)
    return mean, invstd


def _cpu_v3_forward(x, mean, invstd, weight, bias, relu):
    y = np.empty_like(x)
    _normalize_v3_cpu(_flat(x), mean, invstd, weight, bias, relu, _flat(y))
    return y


def _cpu_v3_backward(dy, x, y, mean, invstd, weight, training, relu):
    C = x.shape[1]
    dweight, dbias = np.empty(C, np.float64), np.empty(C, np.float64)
    dx = np.empty_like(x)
    g = dy
    if relu:
        g = dx  # the masked gradient, overwritten by dx in place
        _relu_mask_v3_cpu(_flat(dy), _flat(y), _flat(g))
    _grad_params_v3_cpu(_flat(g), _flat(x), mean, invstd, dweight, dbias)
    _grad_input_v3_cpu(_flat(g), _flat(x), mean, invstd, weight, dweight, dbias, training,
                       _flat(dx))
    return dx, dweight.astype(x.dtype), dbias.astype(x.dtype)


def _cpu_v3_forward_add(x, mean, invstd, weight, bias, relu, residual):
    y = np.empty_like(x)
    _normalize_add_v3_cpu(_flat(x), mean, invstd, weight, bias, _flat(residual), relu,
                          _flat(y))
    return y


def _cpu_v3_backward_add(dy, x, y, mean, invstd, weight, training, relu):
    g = dy
    if relu:
        g = np.empty_like(dy)
        _after_relu_v3_cpu(_flat(dy), _flat(y), _flat(g))
    dx, dweight, dbias = _cpu_v3_backward(g, x, x, mean, invstd, weight, training, False)
    return dx, dweight, dbias, g


# forward_add / backward_add: the block-end fusion relu(bn(x) + residual), where a variant
# has it in one pass (the others compose forward/backward with array operations)
Variant = namedtuple("Variant", "device stats forward backward description forward_add "
                                "backward_add", defaults=(None, None))
VARIANTS = {
    "cpu_v1": Variant("cpu", _cpu_stats, _cpu_forward, _cpu_backward,
                      "Numba loops: a channel per iteration for sums, a plane for the rest"),
    "cpu_v2": Variant("cpu", _cpu_v2_stats, _cpu_v2_forward, _cpu_v2_backward,
                      "as cpu_v1 over flat planes, sums reassociated into SIMD accumulators"),
    "cpu_v3": Variant("cpu", _cpu_v3_stats, _cpu_v3_forward, _cpu_v3_backward,
                      "cpu_v1's arithmetic bit for bit, four channels' sums side by side",
                      _cpu_v3_forward_add, _cpu_v3_backward_add),
    "cuda_v1": Variant("cuda", lazy("batch_norm_cuda", "stats"),
                       lazy("batch_norm_cuda", "forward"), lazy("batch_norm_cuda", "backward"),
                       "a block per channel for sums (shared-memory tree), a thread per "
                       "element for the rest", lazy("batch_norm_cuda", "forward_add"),
                       lazy("batch_norm_cuda", "backward_add")),
}
# cpu_v2 is the fastest and agrees with cpu_v1 to 1e-7, but its other summation order sends a
# 4000-iteration training run down another path: the demo scored 0.388 / 0.421 with it against
# 0.419 / 0.490 (without / with CRF).  Every recorded training figure (demo, lessons, the
# CRF-layer comparison) was made with cpu_v1's sums, so the default is cpu_v3, which computes
# the same bits faster.  Pass variant="cpu_v2" or set DEFAULT["cpu"] to use cpu_v2.
DEFAULT = {"cpu": "cpu_v3", "cuda": "cuda_v1"}


def check_bn_args(x, running_mean, running_var, weight, bias):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"batch_norm: x must be 4-D (N, C, H, W), got shape {np.shape(x)}")
    C = x.shape[1]
    for name, a in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if a is not None and tuple(a.shape) != (C,):
            raise ValueError(f"batch_norm: {name} must have shape ({C},) for x of shape "
                             f"{x.shape}, got {tuple(a.shape)}")


def batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum=0.1,
                       eps=1e-5, relu=False, variant=None, residual=None):
    """y and (mean, invstd) for the backward.  In training the running statistics (float
    arrays of shape (C,)) are updated in place.  With ``residual`` (an array of x's shape and
    dtype, a ResNet block's shortcut) y = bn(x) + residual, then the ReLU if ``relu``: the
    same bits as the three operations one after another."""
    check_bn_args(x, running_mean, running_var, weight, bias)
    if residual is not None and (tuple(residual.shape) != tuple(x.shape) or
                                 residual.dtype != x.dtype):
        raise ValueError(f"batch_norm: residual must have x's shape {tuple(x.shape)} and dtype "
                         f"{x.dtype}, got {tuple(residual.shape)} {residual.dtype}")
    xp = array_module(x)
    x = xp.ascontiguousarray(x)
    N, C, H, W = x.shape
    impl = pick(VARIANTS, DEFAULT, x, variant)
    if training:
        m = N * H * W
        if m < 2:
            raise ValueError(f"batch_norm: training needs more than one value per channel, got "
                             f"input of shape {x.shape}")
        mean, invstd = impl.stats(x, eps)
        if running_mean is not None:
            var = 1.0 / invstd**2 - eps
            running_mean *= 1 - momentum
            running_mean += (momentum * mean).astype(running_mean.dtype)
            running_var *= 1 - momentum
            running_var += (momentum * var * m / (m - 1)).astype(running_var.dtype)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm: inference needs running_mean and running_var")
        mean = running_mean.astype(xp.float64)
        invstd = 1.0 / xp.sqrt(running_var.astype(xp.float64) + eps)
    weight = xp.ones(C, x.dtype) if weight is None else weight.astype(x.dtype)
    bias = xp.zeros(C, x.dtype) if bias is None else bias.astype(x.dtype)
    if residual is None:
        y = impl.forward(x, mean, invstd, weight, bias, bool(relu))
    elif impl.forward_add is not None:
        y = impl.forward_add(x, mean, invstd, weight, bias, bool(relu),
                             xp.ascontiguousarray(residual))
    else:  # the operations one after another, as the autograd graph would run them
        y = impl.forward(x, mean, invstd, weight, bias, False) + residual
        y = y * (y > 0) if relu else y
    return y, (mean, invstd)


def batch_norm_backward(dy, x, y, saved, weight, training, relu=False, variant=None,
                        residual=False):
    """(dx, dweight, dbias); ``y`` is needed only when fused with ReLU (its mask).  With
    ``residual`` (the forward had one) the residual's gradient comes fourth."""
    xp = array_module(x)
    mean, invstd = saved
    C = x.shape[1]
    weight = xp.ones(C, x.dtype) if weight is None else weight.astype(x.dtype)
    y = x if y is None else y
    impl = pick(VARIANTS, DEFAULT, x, variant)
    dy = xp.ascontiguousarray(dy)
    if not residual:
        return impl.backward(dy, x, y, mean, invstd, weight, bool(training), bool(relu))
    if impl.backward_add is not None:
        return impl.backward_add(dy, x, y, mean, invstd, weight, bool(training), bool(relu))
    g = dy * (y > 0) if relu else dy  # ReLU's backward, as ops.relu computes it
    return (*impl.backward(g, x, x, mean, invstd, weight, bool(training), False), g)
