"""Atrous (dilated) 2-D convolution, forward and backward: the math, the dispatch, the variants.

Shapes: x (N, C, H, W), w (K, C, kh, kw), b (K,), y (N, K, Ho, Wo).  Stride s, padding pad and
dilation d are (h, w) pairs; below each letter stands for its h or w component.

Forward (DeepLab v2 §3.1, eq. 1, in 2-D with stride and padding; x is zero outside the image):

    y[n,k,i,j] = b[k] + Σ_{c,p,q} w[k,c,p,q] · x[n, c, i·s − pad + p·d, j·s − pad + q·d]

Output size: the last tap of the dilated kernel sits d·(kh − 1) pixels below the first, so

    Ho = ⌊(H + 2·pad − d·(kh − 1) − 1) / s⌋ + 1          (Wo likewise)

With s = 1 and pad = d, a 3×3 kernel gives Ho = H: the field of view grows with d, the size not.

Backward, with dy = ∂L/∂y of shape (N, K, Ho, Wo):

    db[k]       = Σ_{n,i,j} dy[n,k,i,j]
    dw[k,c,p,q] = Σ_{n,i,j} dy[n,k,i,j] · x[n, c, i·s − pad + p·d, j·s − pad + q·d]
    dx[n,c,h,v] = Σ_{k,p,q,i,j with i·s − pad + p·d = h and j·s − pad + q·d = v}
                  w[k,c,p,q] · dy[n,k,i,j]

The im2col view (how DeepLab's Caffe code computes it): gather the receptive fields into
``cols[(c,p,q), (n,i,j)] = x[n, c, i·s − pad + p·d, j·s − pad + q·d]`` (zero when outside), then
with ``w2d = w.reshape(K, C·kh·kw)`` everything is a matrix product:

    y2d = w2d @ cols + b,    dw2d = dy2d @ colsᵀ,    dcols = w2dᵀ @ dy2d,    dx = col2im(dcols)

where col2im, the transpose of im2col, adds each column entry back onto the pixel it came from.

Variants (``VARIANTS``; one parametrised test runs them all against the same references):

    cpu_v1   naive direct loops (Numba), the teaching version
    cpu_v2   im2col with holes + BLAS GEMM via numpy.matmul; 1×1 convolutions skip im2col
    cuda_v1  one CUDA thread per output element (and per input pixel / weight for backward)
    cuda_v2  im2col / col2im CUDA kernels + cuBLAS GEMM via cupy.matmul
    cuda_v3  tiled shared-memory implicit GEMM: im2col happens while loading the tiles

The library uses ``DEFAULT[device]``.  The im2col buffer is bounded (``COLS_BUDGET_BYTES``): the
work is cut into chunks of images, or of output rows within one image, so a 1024-channel 65×65
layer never needs gigabytes.
"""
from collections import namedtuple

import numpy as np

from tinydeeplab.backend import array_module, is_cupy_array

from . import atrous_conv_cpu as _cpu

Variant = namedtuple("Variant", "device forward backward description")


def _pair(value, name, minimum):
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return tuple(int(v) for v in pair)


def output_size(H, W, kh, kw, stride, padding, dilation):
    """(Ho, Wo) by the formula in the module docstring; values ≤ 0 mean "no output"."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return Ho, Wo


def check_conv_args(x, w, b, stride, padding, dilation, dy=None):
    """Validate shapes and hyper-parameters; return them as (h, w) pairs and (Ho, Wo)."""
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"conv2d: x must be 4-D (N, C, H, W), got shape {np.shape(x)}")
    if getattr(w, "ndim", None) != 4:
        raise ValueError(f"conv2d: w must be 4-D (K, C, kh, kw), got shape {np.shape(w)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(
            f"conv2d: channel mismatch: x has C={x.shape[1]} (shape {x.shape}) but w expects "
            f"C={w.shape[1]} (shape {w.shape})"
        )
    if min(w.shape) == 0 or min(x.shape) == 0:
        raise ValueError(f"conv2d: empty input: x {x.shape}, w {w.shape}")
    if x.dtype != w.dtype or x.dtype not in (np.float32, np.float64):
        raise ValueError(
            f"conv2d: x and w must both be float32 or both float64, got {x.dtype} and {w.dtype}"
        )
    if b is not None and (b.shape != (w.shape[0],) or b.dtype != w.dtype):
        raise ValueError(
            f"conv2d: b must have shape ({w.shape[0]},) and dtype {w.dtype}, got "
            f"{b.shape} {b.dtype}"
        )
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    Ho, Wo = output_size(x.shape[2], x.shape[3], w.shape[2], w.shape[3], stride, padding,
                         dilation)
    if Ho <= 0 or Wo <= 0:
        raise ValueError(
            f"conv2d: output size {Ho}×{Wo} ≤ 0 for input {x.shape}, kernel {w.shape}, "
            f"stride {stride}, padding {padding}, dilation {dilation}: the dilated kernel "
            f"spans {dilation[0] * (w.shape[2] - 1) + 1}×{dilation[1] * (w.shape[3] - 1) + 1} "
            "pixels, more than the padded input"
        )
    if dy is not None:
        expected = (x.shape[0], w.shape[0], Ho, Wo)
        if tuple(dy.shape) != expected or dy.dtype != x.dtype:
            raise ValueError(
                f"conv2d_backward: dy has shape {dy.shape} {dy.dtype}, expected {expected} "
                f"{x.dtype}"
            )
    return stride, padding, dilation, (Ho, Wo)


# ---- the im2col + GEMM driver, shared by cpu_v2 and cuda_v2 -----------------------------------
COLS_BUDGET_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}


def plan_chunks(N, Ho, bytes_per_row, budget):
    """Cut (images, output rows) into chunks whose im2col buffer fits ``budget`` bytes.

    Yields (n0, n1, r0, r1): whole images while one image fits, else rows of one image.
    """
    per_image = bytes_per_row * Ho
    if per_image <= budget:
        step = max(1, budget // per_image)
        for n0 in range(0, N, step):
            yield n0, min(N, n0 + step), 0, Ho
    else:
        rows = max(1, budget // bytes_per_row)
        for n0 in range(N):
            for r0 in range(0, Ho, rows):
                yield n0, n0 + 1, r0, min(Ho, r0 + rows)


def _is_pointwise(w, stride, padding):
    return w.shape[2] == 1 and w.shape[3] == 1 and stride == (1, 1) and padding == (0, 0)


def gemm_forward(x, w, b, stride, padding, dilation, im2col):
    xp = array_module(x)
    N, C, H, W = x.shape
    K = w.shape[0]
    Ho, Wo = output_size(H, W, w.shape[2], w.shape[3], stride, padding, dilation)
    w2d = w.reshape(K, -1)  # (K, C·kh·kw)
    if _is_pointwise(w, stride, padding):  # 1×1: x itself is the column matrix
        y = xp.matmul(w2d, x.reshape(N, C, H * W)).reshape(N, K, Ho, Wo)
    else:
        y = xp.empty((N, K, Ho, Wo), dtype=x.dtype)
        device = "cuda" if is_cupy_array(x) else "cpu"
        row_bytes = w2d.shape[1] * Wo * x.itemsize
        for n0, n1, r0, r1 in plan_chunks(N, Ho, row_bytes, COLS_BUDGET_BYTES[device]):
            cols = im2col(x[n0:n1], w.shape, stride, padding, dilation, r0, r1, Wo)
            out = xp.matmul(w2d, cols).reshape(K, n1 - n0, r1 - r0, Wo)  # (K, nb, rows, Wo)
            y[n0:n1, :, r0:r1] = out.transpose(1, 0, 2, 3)
    if b is not None:
        y += b.reshape(1, K, 1, 1)
    return y


def gemm_backward(x, w, dy, stride, padding, dilation, im2col, col2im):
    xp = array_module(x)
    N, C, H, W = x.shape
    K = w.shape[0]
    Ho, Wo = dy.shape[2], dy.shape[3]
    w2d = w.reshape(K, -1)
    db = dy.sum(axis=(0, 2, 3))
    if _is_pointwise(w, stride, padding):
        x3, dy3 = x.reshape(N, C, H * W), dy.reshape(N, K, H * W)
        dw2d = xp.matmul(dy3, x3.transpose(0, 2, 1)).sum(axis=0)  # Σ_n dy[n] @ x[n]ᵀ
        dx = xp.matmul(w2d.T, dy3).reshape(N, C, H, W)
        return dx, dw2d.reshape(w.shape), db
    dx = xp.zeros_like(x)
    dw2d = xp.zeros_like(w2d)
    device = "cuda" if is_cupy_array(x) else "cpu"
    row_bytes = w2d.shape[1] * Wo * x.itemsize
    for n0, n1, r0, r1 in plan_chunks(N, Ho, row_bytes, COLS_BUDGET_BYTES[device]):
        cols = im2col(x[n0:n1], w.shape, stride, padding, dilation, r0, r1, Wo)
        dy2d = dy[n0:n1, :, r0:r1].transpose(1, 0, 2, 3).reshape(K, -1)  # (K, nb·rows·Wo)
        dw2d += xp.matmul(dy2d, cols.T)
        dcols = xp.matmul(w2d.T, dy2d)
        col2im(dcols, dx[n0:n1], w.shape, stride, padding, dilation, r0, r1, Wo)
    return dx, dw2d.reshape(w.shape), db


def _cpu_v2_forward(x, w, b, stride, padding, dilation):
    return gemm_forward(x, w, b, stride, padding, dilation, _cpu.im2col_dilated)


def _cpu_v2_backward(x, w, dy, stride, padding, dilation):
    return gemm_backward(x, w, dy, stride, padding, dilation, _cpu.im2col_dilated,
                         _cpu.col2im_dilated)


def _cuda():
    # Imported on first use: numba.cuda reads NUMBA_ENABLE_CUDASIM when it is first imported.
    from . import atrous_conv_cuda

    return atrous_conv_cuda


def _cuda_v2_forward(x, w, b, stride, padding, dilation):
    return gemm_forward(x, w, b, stride, padding, dilation, _cuda().im2col_dilated)


def _cuda_v2_backward(x, w, dy, stride, padding, dilation):
    m = _cuda()
    return gemm_backward(x, w, dy, stride, padding, dilation, m.im2col_dilated, m.col2im_dilated)


def _lazy_cuda(name):
    def call(*args):
        return getattr(_cuda(), name)(*args)

    call.__name__ = name
    return call


VARIANTS = {
    "cpu_v1": Variant("cpu", _cpu.forward_v1, _cpu.backward_v1, "naive direct loops"),
    "cpu_v2": Variant("cpu", _cpu_v2_forward, _cpu_v2_backward, "im2col with holes + GEMM"),
    "cuda_v1": Variant("cuda", _lazy_cuda("forward_v1"), _lazy_cuda("backward_v1"),
                       "one thread per output element / input pixel / weight"),
    "cuda_v2": Variant("cuda", _cuda_v2_forward, _cuda_v2_backward,
                       "im2col / col2im kernels + cuBLAS GEMM"),
    "cuda_v3": Variant("cuda", _lazy_cuda("forward_v3"), _lazy_cuda("backward_v3"),
                       "tiled shared-memory implicit GEMM"),
}
DEFAULT = {"cpu": "cpu_v2", "cuda": "cuda_v2"}


def _pick(x, variant):
    if variant is None:
        return VARIANTS[DEFAULT["cuda" if is_cupy_array(x) else "cpu"]]
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant]


def conv2d_forward(x, w, b=None, stride=1, padding=0, dilation=1, variant=None):
    """y = conv(x, w) + b on arrays (NumPy → CPU kernels, CuPy → CUDA kernels)."""
    stride, padding, dilation, _ = check_conv_args(x, w, b, stride, padding, dilation)
    xp = array_module(x)
    x, w = xp.ascontiguousarray(x), xp.ascontiguousarray(w)
    return _pick(x, variant).forward(x, w, b, stride, padding, dilation)


def conv2d_backward(x, w, dy, stride=1, padding=0, dilation=1, variant=None):
    """(dx, dw, db) for dy = ∂L/∂y; db is returned whether or not the forward had a bias."""
    stride, padding, dilation, _ = check_conv_args(x, w, None, stride, padding, dilation, dy)
    xp = array_module(x)
    x, w, dy = xp.ascontiguousarray(x), xp.ascontiguousarray(w), xp.ascontiguousarray(dy)
    return _pick(x, variant).backward(x, w, dy, stride, padding, dilation)
