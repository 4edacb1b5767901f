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
    cpu_v3   v2 with the cheaper lowering per shape: kn2row forward when K < C (GEMM first,
             then add the shifted tap planes), and for stride 1 the backward as a convolution
             of dy with the flipped kernel (no col2im; dw from the same buffer)
    cpu_v4   v3, but large stride-1 3×3 layers by Winograd F(2×2, 3×3) (forward, dx and dw):
             16 smaller GEMMs with 2.25× fewer multiply-adds (atrous_conv_winograd)
    cpu_v5   v4 with the channels last inside Winograd (images (N, H, W, C), tiles (16,
             tiles, C)): the transforms become loops over contiguous channels, in SIMD, and
             cost a fraction of v4's, so Winograd pays on smaller layers too
    cpu_v6   v5, but F(4×4, 3×3) on layers with many tiles that fit the map: 36 GEMMs with
             4× fewer multiply-adds than im2col (float32 error ~20× F(2×2)'s: ~1e-5)
    cpu_v7   v6, but layers with few input channels (C·kh·kw ≤ 576: the stems, the 16-64-
             channel 3×3 layers) forward without im2col where Winograd does not pay: blocks
             of outputs summed in vector registers straight from the padded image; the
             stems' weight gradient likewise (atrous_conv_direct)
    cuda_v1  one CUDA thread per output element (and per input pixel / weight for backward)
    cuda_v2  im2col / col2im CUDA kernels + cuBLAS GEMM via cupy.matmul
    cuda_v3  tiled shared-memory implicit GEMM: im2col happens while loading the tiles
    cuda_v4  cpu_v3's lowerings with CUDA kernels + cuBLAS

The library uses ``DEFAULT[device]``.  The im2col buffer is bounded (``COLS_BUDGET_BYTES``): the
work is cut into chunks of images, or of output rows within one image, so a 1024-channel 65×65
layer never needs gigabytes.
"""
import functools
import math
import threading
from collections import namedtuple

import numpy as np

from tinydeeplab.backend import array_module, is_cupy_array, on_gpu

from . import atrous_conv_cpu as _cpu
from . import atrous_conv_direct as _direct
from . import atrous_conv_winograd as _winograd
from ._common import int_pair, lazy, pick

# backward_weights: (dw, db) alone, for inputs that need no gradient (None: use backward)
Variant = namedtuple("Variant", "device forward backward description backward_weights",
                     defaults=(None,))


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
    stride = int_pair(stride, "stride", 1, "conv2d")
    padding = int_pair(padding, "padding", 0, "conv2d")
    dilation = int_pair(dilation, "dilation", 1, "conv2d")
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
# On the CPU im2col takes as few whole images at a time as fit in this much, so that the
# GEMMs read the columns from cache right after im2col wrote them instead of from memory:
# the tiny model's 7×7/2 stem (15 MB of columns for 4 × 161²) runs as four 3.9 MB pieces.
# Forward: the tiny training step took 0.97× and 0.99× the time in two runs (machine B, in
# turns; the stem's forward alone 0.90×: 0.83 against 0.93 ms).  The stem's weight gradient
# (its input needs none): 0.74× [0.60-0.86] (machine C, 9 rounds in turns).
# Whole images only: the GEMMs are one per image either way and dw adds them up image by
# image in the same order, so every result keeps its bits (cutting an image's rows would
# change the GEMMs' shapes, and OpenBLAS's summation order with them).  The backward of a
# stride-1 3×3 layer, which takes several images in one GEMM, keeps COLS_BUDGET_BYTES.
PIECE_BYTES = 4 << 20


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
    """1×1 without padding: the (strided) input itself is the column matrix."""
    return w.shape[2] == 1 and w.shape[3] == 1 and padding == (0, 0)


class _Workspace(threading.local):
    """Reusable im2col buffers, one set per thread.

    A fresh 64 MB NumPy array costs thousands of page faults on first touch (the OS hands out
    zeroed pages lazily), which took as long as the im2col copy itself.  Keeping the buffer
    between calls removes that cost; at most ``COLS_BUDGET_BYTES["cpu"]`` per buffer is held.
    CuPy has its own memory pool, so GPU buffers are simply allocated.
    """

    def get(self, name, shape, dtype, xp):
        if xp is not np:
            return xp.empty(shape, dtype=dtype)
        size = math.prod(shape)
        buf = getattr(self, name, None)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = np.empty(size, dtype=dtype)
            setattr(self, name, buf)
        return buf[:size].reshape(shape)


_workspace = _Workspace()


def _rows_of(a, n, r0, r1, Wo):
    """a[n, :, r0:r1, :] as a (K, (r1 − r0)·Wo) matrix view (rows of a plane are contiguous)."""
    return a[n].reshape(a.shape[1], -1)[:, r0 * Wo: r1 * Wo]


def _budget(x):
    """The im2col buffer budget, in bytes, for x's device."""
    return COLS_BUDGET_BYTES["cuda" if on_gpu(x) else "cpu"]


def _piece_budget(x, row_bytes, Ho):
    """The budget for im2col followed by one GEMM per image: cache-sized pieces of whole
    images on the CPU where one image fits in a piece (see PIECE_BYTES)."""
    budget = _budget(x)
    if array_module(x) is np and row_bytes * Ho <= PIECE_BYTES:
        budget = min(budget, PIECE_BYTES)
    return budget


# cpu_v4 takes Winograd where it measured faster than v3 on 2 cores (benchmarks/RESULTS.md):
# both channel counts ≥ 64 and ≥ 1.5 GFLOP in the layer.  Below that the transforms and the
# 16 small GEMMs cost more than they save (a 64-channel 81×81 layer: 1.14× v3's time; an ASPP
# classifier, 2048 → 21 channels: 7×); above it 0.56-0.88×.
WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_FLOPS = 64, 1.5e9
# cpu_v5's transforms cost a fraction of v4's, so it pays on smaller layers, where three
# things hold (forward + backward against v3, in turns on 2 cores): ≥ 0.4 GFLOP; ≥ 256 tiles,
# for the 16 GEMMs' rows (one 21² map, 121 tiles: 0.93-1.17× at 256-1024 channels;
# 1 × 256 × 33², 289 tiles: 0.85×); and tiles that fit the map, their 2×2 outputs no more
# than 12.5 % past it (4 × 128 × 21² at rate 4 has 31 % beyond: 1.23×).  Where the FLOPs
# start to pay depends on how fast the machine's GEMMs are next to its memory: on machine B
# (sgemm ~430 GFLOP/s) 0.75-0.97× v3's time above 0.6 GFLOP, 1.08-1.6× below; on machine C
# (~170 GFLOP/s; benchmarks/bench_conv_rules.py) 0.81-0.86× from 0.48 GFLOP (the tiny
# model's 4 × 128 × 21² at rate 2, ResNet-50's 1 × 64 × 81² and 1 × 128 × 41²), 0.90× at
# 0.31, 1.03× at 0.26, 1.20× at 0.13.  0.4 lies between the two crossovers.
WINOGRAD_CL_MIN_FLOPS, WINOGRAD_CL_MIN_TILES, WINOGRAD_CL_MAX_OVERHANG = 0.4e9, 256, 0.125
# cpu_v6 takes F(4×4, 3×3) instead of F(2×2) where cpu_v5 takes Winograd and also (forward +
# backward against F(2×2), in turns on 2 cores): both channel counts ≥ 128 (64: 1.0×); ≥ 256
# of its 4×4 tiles, for the 36 GEMMs' rows (1 × 256 × 41², 121 tiles: 1.07-1.16×; 4 × 256 ×
# 41², 484: 0.82×; 1 × 256 × 65², 289: 0.86×); and outputs no more than 25 % past the map
# (41² at rate 4, 37 %: 1.07-1.65×).
WINOGRAD4_MIN_CHANNELS, WINOGRAD4_MIN_TILES, WINOGRAD4_MAX_OVERHANG = 128, 256, 0.25


# The Winograd lowerings: the suffix of their functions in atrous_conv_winograd
_WINOGRAD = {"winograd": "", "winograd_cl": "_cl", "winograd_cl4": "_cl"}


def winograd_pays(x_shape, w_shape, stride, padding, dilation, itemsize=4,
                  lowering="winograd"):
    """Whether cpu_v4 (``lowering`` "winograd") or cpu_v5 and v6 ("winograd_cl",
    "winograd_cl4") compute this convolution by Winograd (see WINOGRAD_MIN_* and
    WINOGRAD_CL_*); not when one image's buffers would exceed the budget (Winograd chunks by
    images; v3 can cut an image into rows)."""
    N, C, H, W = x_shape
    K = w_shape[0]
    if not _winograd.applies(w_shape, stride) or min(C, K) < WINOGRAD_MIN_CHANNELS:
        return False
    Ho, Wo = output_size(H, W, 3, 3, stride, padding, dilation)
    flops = 2 * K * C * 9 * N * Ho * Wo
    if flops < (WINOGRAD_MIN_FLOPS if lowering == "winograd" else WINOGRAD_CL_MIN_FLOPS):
        return False  # first, as the cheapest test: most small layers stop here
    tiles = len(_winograd.tile_origins(Ho, dilation[0])) * len(
        _winograd.tile_origins(Wo, dilation[1]))
    if lowering != "winograd":  # the channels-last rungs
        if N * tiles < WINOGRAD_CL_MIN_TILES or \
                4 * tiles > (1 + WINOGRAD_CL_MAX_OVERHANG) * Ho * Wo:
            return False
        per_image = _winograd.channels_last_bytes(C, K, Ho, Wo, dilation, itemsize)
    else:
        per_image = 16 * (C + K) * tiles * itemsize
    return per_image <= COLS_BUDGET_BYTES["cpu"]


def winograd_tile(x_shape, w_shape, padding, dilation):
    """cpu_v6's tile: 4 (F(4×4, 3×3)) where WINOGRAD4_* hold, else 2 (F(2×2), like cpu_v5);
    for layers where ``winograd_pays``.  Its buffers then fit the budget too: with outputs at
    most 25 % past the map, V and M hold ≤ 36 · 1.25 / 16 = 2.8 numbers per output and
    channel, F(2×2)'s ≥ 16 / 4 = 4."""
    N, C, H, W = x_shape
    K = w_shape[0]
    if min(C, K) < WINOGRAD4_MIN_CHANNELS:
        return 2
    Ho, Wo = output_size(H, W, 3, 3, (1, 1), padding, dilation)
    tiles = len(_winograd.tile_origins(Ho, dilation[0], 4)) * len(
        _winograd.tile_origins(Wo, dilation[1], 4))
    if N * tiles < WINOGRAD4_MIN_TILES or 16 * tiles > (1 + WINOGRAD4_MAX_OVERHANG) * Ho * Wo:
        return 2
    return 4


def _winograd_functions(lowering, x, w, padding, dilation):
    """(forward, weight_gradient, input_gradient) of the Winograd ``lowering``; cpu_v6's with
    its tile size for this layer bound."""
    names = ("forward", "weight_gradient", "input_gradient")
    fns = [getattr(_winograd, name + _WINOGRAD[lowering]) for name in names]
    if lowering != "winograd_cl4":
        return fns
    m = winograd_tile(x.shape, w.shape, padding, dilation)
    return [functools.partial(fn, m=m) for fn in fns]


def _buffer(name, shape, dtype):
    return _workspace.get(name, shape, dtype, np)


def gemm_forward(x, w, b, stride, padding, dilation, kern, lowering):
    """Forward by GEMM.  ``kern``: the device's kernel module (im2col, col2im, shift_add).

    lowering "im2col": y2d = w2d @ cols (v2, the Caffe way).
    lowering "adaptive" (v3): when K < C use kn2row instead: z = w_taps @ x, one GEMM with
    K·kh·kw rows and no im2col at all, then y[k,i,j] = Σ_{p,q} z[(k,p,q), h(i,p), v(j,q)] by
    ``shift_add``.  Its buffer holds K·kh·kw rows instead of im2col's C·kh·kw.
    """
    xp = array_module(x)
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    Ho, Wo = output_size(H, W, kh, kw, stride, padding, dilation)
    if lowering == "direct":  # cpu_v7: cpu_v6's way, but the direct rung where it pays and
        lowering = "winograd_cl4"  # Winograd does not
        if xp is np and _direct.pays(w.shape, x.dtype, Wo) and not winograd_pays(
                x.shape, w.shape, stride, padding, dilation, x.itemsize, lowering):
            return _direct.forward(x, w, b, stride, padding, dilation, buffer=_buffer)
    if lowering in _WINOGRAD and xp is np and winograd_pays(x.shape, w.shape, stride, padding,
                                                            dilation, x.itemsize, lowering):
        forward = _winograd_functions(lowering, x, w, padding, dilation)[0]
        return forward(x, w, b, padding, dilation, _budget(x), _buffer)
    y = xp.empty((N, K, Ho, Wo), dtype=x.dtype)
    if _is_pointwise(w, stride, padding):  # 1×1: x itself (subsampled) is the column matrix
        w2d = w.reshape(K, C)
        xs = xp.ascontiguousarray(x[:, :, ::stride[0], ::stride[1]])  # (N, C, Ho, Wo)
        for n in range(N):
            xp.matmul(w2d, xs[n].reshape(C, Ho * Wo), out=y[n].reshape(K, Ho * Wo))
    elif lowering != "im2col" and K < C and \
            K * kh * kw * H * W * x.itemsize <= _budget(x):
        _kn2row_forward(x, w, y, stride, padding, dilation, kern)
    else:
        _im2col_forward(x, w, y, stride, padding, dilation, kern)
    if b is not None:
        y += b.reshape(1, K, 1, 1)
    return y


def _im2col_forward(x, w, y, stride, padding, dilation, kern):
    xp = array_module(x)
    K, Ho, Wo = y.shape[1:]
    w2d = w.reshape(K, -1)  # (K, C·kh·kw)
    row_bytes = w2d.shape[1] * Wo * x.itemsize
    for n0, n1, r0, r1 in plan_chunks(x.shape[0], Ho, row_bytes,
                                      _piece_budget(x, row_bytes, Ho)):
        L = (r1 - r0) * Wo  # columns per image in this chunk
        cols = _workspace.get("cols", (w2d.shape[1], (n1 - n0) * L), x.dtype, xp)
        kern.im2col_dilated(x[n0:n1], w.shape, stride, padding, dilation, r0, r1, Wo, cols)
        for n in range(n0, n1):  # GEMM straight into y: no temporary, no transpose
            i = n - n0
            xp.matmul(w2d, cols[:, i * L:(i + 1) * L], out=_rows_of(y, n, r0, r1, Wo))


def _kn2row_forward(x, w, y, stride, padding, dilation, kern):
    xp = array_module(x)
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    R = K * kh * kw
    w_taps = xp.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(R, C)  # rows (k, p, q)
    for n0, n1, _, _ in plan_chunks(N, 1, R * H * W * x.itemsize, _budget(x)):
        z = _workspace.get("cols", (n1 - n0, R, H, W), x.dtype, xp)
        for n in range(n0, n1):
            xp.matmul(w_taps, x[n].reshape(C, H * W), out=z[n - n0].reshape(R, H * W))
        kern.shift_add(z, y[n0:n1], kh, kw, stride, padding, dilation)


def _matmul_nt(a, b):
    """a @ bᵀ for the weight gradients (a long shared dimension, a small result), computed as
    (b @ aᵀ)ᵀ when b has more rows: OpenBLAS runs these shapes faster with the larger output
    dimension first — e.g. the 7×7 stem's dw (16 × 26244 by 147 × 26244) in 0.62 ms instead
    of 1.40 (machine B, 2 threads)."""
    xp = array_module(a)
    if a.shape[0] < b.shape[0]:
        return xp.matmul(b, a.T).T
    return xp.matmul(a, b.T)


def gemm_backward(x, w, dy, stride, padding, dilation, kern, lowering, need_dx=True):
    """(dx, dw, db) by GEMM; see ``gemm_forward`` for ``kern`` and ``lowering``.

    "im2col" (v2): dw2d = Σ dy2d @ colsᵀ, dx = col2im(w2dᵀ @ dy2d).
    "adaptive" (v3), stride 1: the gradient w.r.t. x of a stride-1 convolution is itself a
    convolution: of dy with the kernel flipped in space and with K and C swapped, padding
    d·(k−1) − pad.  With dcols = im2col of dy for that convolution (K·kh·kw rows, no col2im):
    dx = w_flip2d @ dcols and, because dcols holds exactly the dy values that met each x pixel,
    dw = dcols @ xᵀ (rows flipped back).  Two GEMMs sharing one small buffer.
    """
    xp = array_module(x)
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    (dh, dw_), (ph, pw) = dilation, padding
    db = dy.sum(axis=(0, 2, 3))
    if lowering == "direct":  # cpu_v7: the stems' dw by the direct rung, else cpu_v6's way
        if not need_dx and xp is np and _direct.weight_gradient_pays(w.shape, x.dtype):
            dw = _direct.weight_gradient(x, dy, kh, stride, padding, dilation,
                                         buffer=_buffer)
            return None, dw, db
        lowering = "winograd_cl4"
    if _is_pointwise(w, stride, padding):
        (sh, sw), (Ho, Wo) = stride, dy.shape[2:]
        w2d, dw2d = w.reshape(K, C), xp.zeros((K, C), dtype=x.dtype)
        xs = xp.ascontiguousarray(x[:, :, ::sh, ::sw])  # the pixels the 1×1 kernel read
        dxs = xp.empty_like(xs) if need_dx else None
        for n in range(N):
            x2d, dy2d = xs[n].reshape(C, Ho * Wo), dy[n].reshape(K, Ho * Wo)
            dw2d += _matmul_nt(dy2d, x2d)
            if need_dx:
                xp.matmul(w2d.T, dy2d, out=dxs[n].reshape(C, Ho * Wo))
        if need_dx and (sh, sw) != (1, 1):
            dx = xp.zeros_like(x)
            dx[:, :, ::sh, ::sw] = dxs
        else:
            dx = dxs
        return dx, dw2d.reshape(w.shape), db
    dx_by_winograd = ph <= 2 * dh and pw <= 2 * dw_  # the flipped convolution's padding ≥ 0
    if lowering in _WINOGRAD and xp is np and (dx_by_winograd or not need_dx) and \
            winograd_pays(x.shape, w.shape, stride, padding, dilation, x.itemsize, lowering):
        # dw as the gradient of the Winograd forward; dx as a Winograd convolution of dy with
        # the flipped kernel (padding 2d − pad; where that is negative, v3's way below)
        _, weight_gradient, input_gradient = _winograd_functions(lowering, x, w, padding,
                                                                 dilation)
        dw = weight_gradient(x, dy, padding, dilation, _budget(x), _buffer)
        dx = input_gradient(w, dy, x.shape, padding, dilation, _budget(x),
                            _buffer) if need_dx else None
        return dx, dw, db
    if not need_dx:
        return (None, *_weights_backward(x, w, dy, stride, padding, dilation, kern), db)
    if lowering != "im2col" and stride == (1, 1) and ph <= dh * (kh - 1) and \
            pw <= dw_ * (kw - 1):
        return (*_flipped_conv_backward(x, w, dy, padding, dilation, kern), db)
    return (*_col2im_backward(x, w, dy, stride, padding, dilation, kern), db)


def _weights_backward(x, w, dy, stride, padding, dilation, kern):
    """dw alone: Σ_n dy2d @ colsᵀ, no col2im (the input needs no gradient)."""
    xp = array_module(x)
    K, Ho, Wo = dy.shape[1:]
    dw2d = xp.zeros((K, w[0].size), dtype=x.dtype)
    row_bytes = dw2d.shape[1] * Wo * x.itemsize
    for n0, n1, r0, r1 in plan_chunks(x.shape[0], Ho, row_bytes,
                                      _piece_budget(x, row_bytes, Ho)):
        L = (r1 - r0) * Wo
        cols = _workspace.get("cols", (dw2d.shape[1], (n1 - n0) * L), x.dtype, xp)
        kern.im2col_dilated(x[n0:n1], w.shape, stride, padding, dilation, r0, r1, Wo, cols)
        for n in range(n0, n1):
            i = n - n0
            dw2d += _matmul_nt(_rows_of(dy, n, r0, r1, Wo), cols[:, i * L:(i + 1) * L])
    return (dw2d.reshape(w.shape),)


def _col2im_backward(x, w, dy, stride, padding, dilation, kern):
    xp = array_module(x)
    K, Ho, Wo = dy.shape[1:]
    w2d = w.reshape(K, -1)
    dw2d = xp.zeros_like(w2d)
    dx = xp.empty_like(x)  # zeroed by a write, not zeros_like: see max_pool._cpu_backward
    dx[...] = 0
    row_bytes = w2d.shape[1] * Wo * x.itemsize
    for n0, n1, r0, r1 in plan_chunks(x.shape[0], Ho, row_bytes,
                                      _piece_budget(x, row_bytes, Ho)):
        L = (r1 - r0) * Wo
        shape = (w2d.shape[1], (n1 - n0) * L)
        cols = _workspace.get("cols", shape, x.dtype, xp)
        dcols = _workspace.get("dcols", shape, x.dtype, xp)
        kern.im2col_dilated(x[n0:n1], w.shape, stride, padding, dilation, r0, r1, Wo, cols)
        for n in range(n0, n1):
            i = n - n0
            dy2d = _rows_of(dy, n, r0, r1, Wo)  # (K, L)
            dw2d += _matmul_nt(dy2d, cols[:, i * L:(i + 1) * L])
            xp.matmul(w2d.T, dy2d, out=dcols[:, i * L:(i + 1) * L])
        kern.col2im_dilated(dcols, dx[n0:n1], w.shape, stride, padding, dilation, r0, r1, Wo)
    return dx, dw2d.reshape(w.shape)


def _flipped_conv_backward(x, w, dy, padding, dilation, kern):
    xp = array_module(x)
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    (dh, dw_), (ph, pw) = dilation, padding
    R = K * kh * kw
    pad_t = (dh * (kh - 1) - ph, dw_ * (kw - 1) - pw)
    w_flip2d = xp.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(C, R)
    dx = xp.empty_like(x)
    dw_flip = xp.zeros((R, C), dtype=x.dtype)  # rows (k, kh−1−p, kw−1−q)
    for n0, n1, r0, r1 in plan_chunks(N, H, R * W * x.itemsize, _budget(x)):
        L = (r1 - r0) * W
        dcols = _workspace.get("cols", (R, (n1 - n0) * L), x.dtype, xp)
        kern.im2col_dilated(dy[n0:n1], w.shape, (1, 1), pad_t, dilation, r0, r1, W, dcols)
        nb = n1 - n0
        if nb > 1 and C <= R and L <= 2048:  # several small images: one GEMM each for dx
            # and dw over the chunk, not one per image, through x and dx laid out as
            # (C, images·pixels) in a buffer no larger than the columns.  Measured on 2 cores
            # for the tiny model's layers (4 × 21² or 41²): 0.83-0.95× the per-image time;
            # on 65² images 1.04×, so larger images stay per image.
            flat = _workspace.get("flat", (C, nb * L), x.dtype, xp)
            xp.matmul(w_flip2d, dcols, out=flat)
            dx[n0:n1] = flat.reshape(C, nb, H, W).transpose(1, 0, 2, 3)
            flat.reshape(C, nb, H, W)[...] = x[n0:n1].transpose(1, 0, 2, 3)
            dw_flip += xp.matmul(dcols, flat.T)
            continue
        for n in range(n0, n1):
            i = n - n0
            block = dcols[:, i * L:(i + 1) * L]
            xp.matmul(w_flip2d, block, out=_rows_of(dx, n, r0, r1, W))
            dw_flip += xp.matmul(block, _rows_of(x, n, r0, r1, W).T)
    dw = dw_flip.reshape(K, kh, kw, C)[:, ::-1, ::-1, :].transpose(0, 3, 1, 2)
    return dx, xp.ascontiguousarray(dw)


def _cuda():
    # Imported on first use: numba.cuda reads NUMBA_ENABLE_CUDASIM when it is first imported.
    from . import atrous_conv_cuda

    return atrous_conv_cuda


def _gemm_variant(device, lowering, description):
    """A registry entry for the GEMM driver with ``lowering`` on ``device``'s kernels."""
    def kern():
        return _cpu if device == "cpu" else _cuda()

    def forward(x, w, b, stride, padding, dilation):
        return gemm_forward(x, w, b, stride, padding, dilation, kern(), lowering)

    def backward(x, w, dy, stride, padding, dilation):
        return gemm_backward(x, w, dy, stride, padding, dilation, kern(), lowering)

    def backward_weights(x, w, dy, stride, padding, dilation):
        _, dw, db = gemm_backward(x, w, dy, stride, padding, dilation, kern(), lowering,
                                  need_dx=False)
        return dw, db

    return Variant(device, forward, backward, description, backward_weights)


VARIANTS = {
    "cpu_v1": Variant("cpu", _cpu.forward_v1, _cpu.backward_v1, "naive direct loops"),
    "cpu_v2": _gemm_variant("cpu", "im2col", "im2col with holes + GEMM"),
    "cpu_v3": _gemm_variant("cpu", "adaptive", "kn2row forward when K < C; backward as a "
                                               "flipped-kernel convolution"),
    "cpu_v4": _gemm_variant("cpu", "winograd", "cpu_v3, with Winograd F(2×2, 3×3) for large "
                                               "stride-1 3×3 layers"),
    "cpu_v5": _gemm_variant("cpu", "winograd_cl", "cpu_v4 with the channels last in the "
                                                  "Winograd transforms (vectorised)"),
    "cpu_v6": _gemm_variant("cpu", "winograd_cl4", "cpu_v5 with Winograd F(4×4, 3×3) where "
                                                   "its 4×4 tiles fit the map"),
    "cpu_v7": _gemm_variant("cpu", "direct", "cpu_v6, with a register-blocked direct "
                                             "forward for layers with few input channels"),
    "cuda_v1": Variant("cuda", lazy("atrous_conv_cuda", "forward_v1"),
                       lazy("atrous_conv_cuda", "backward_v1"),
                       "one thread per output element / input pixel / weight"),
    "cuda_v2": _gemm_variant("cuda", "im2col", "im2col / col2im kernels + cuBLAS GEMM"),
    "cuda_v3": Variant("cuda", lazy("atrous_conv_cuda", "forward_v3"),
                       lazy("atrous_conv_cuda", "backward_v3"), "tiled shared-memory implicit GEMM"),
    "cuda_v4": _gemm_variant("cuda", "adaptive", "cpu_v3's lowerings with CUDA kernels + "
                                                 "cuBLAS"),
}
DEFAULT = {"cpu": "cpu_v7", "cuda": "cuda_v4"}


def kernel_source(variant):
    """The Python source of the forward kernel of the teaching variant "cpu_v1" (the loops)
    or "cuda_v1" (one thread per output): one piece of index math, two devices."""
    import inspect

    if variant == "cpu_v1":
        return inspect.getsource(_cpu._forward_v1)
    if variant == "cuda_v1":
        from . import atrous_conv_cuda

        kernel = atrous_conv_cuda._forward_v1_kernel
        return inspect.getsource(getattr(kernel, "py_func", kernel))
    raise ValueError(f"variant must be 'cpu_v1' or 'cuda_v1', got {variant!r}")


def conv2d_forward(x, w, b=None, stride=1, padding=0, dilation=1, variant=None):
    """y = conv(x, w) + b on arrays (NumPy → CPU kernels, CuPy → CUDA kernels)."""
    stride, padding, dilation, _ = check_conv_args(x, w, b, stride, padding, dilation)
    xp = array_module(x)
    x, w = xp.ascontiguousarray(x), xp.ascontiguousarray(w)
    return pick(VARIANTS, DEFAULT, x, variant).forward(x, w, b, stride, padding, dilation)


def conv2d_backward(x, w, dy, stride=1, padding=0, dilation=1, variant=None, need_dx=True):
    """(dx, dw, db) for dy = ∂L/∂y; db is returned whether or not the forward had a bias.

    ``need_dx=False`` (an input that needs no gradient, like the image) returns dx = None and
    lets the GEMM variants skip computing it."""
    stride, padding, dilation, _ = check_conv_args(x, w, None, stride, padding, dilation, dy)
    xp = array_module(x)
    x, w, dy = xp.ascontiguousarray(x), xp.ascontiguousarray(w), xp.ascontiguousarray(dy)
    impl = pick(VARIANTS, DEFAULT, x, variant)
    if not need_dx and impl.backward_weights is not None:
        return (None, *impl.backward_weights(x, w, dy, stride, padding, dilation))
    dx, dw, db = impl.backward(x, w, dy, stride, padding, dilation)
    return (dx if need_dx else None), dw, db
