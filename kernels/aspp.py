"""The ASPP head's parallel atrous convolutions as one convolution (DeepLab v2 §3.3, Fig. 4).

ASPP runs B convolutions on the same input x, branch b with rate r_b and "same" padding
r_b·(k − 1)/2 (3×3 kernels, padding r_b, in DeepLab), and sums their outputs:

    y = Σ_b conv(x, w_b, rate r_b) + Σ_b bias_b

Tap (p, q) of branch b reads x shifted by (oy, ox) = (p·r_b − pad_b, q·r_b − pad_b).  Listing
every branch's taps as t = 1..T (T = 4 · 9 for DeepLab's ASPP), y is one convolution with
taps at scattered offsets:

    y[n,k,i,j] = Σ_b bias_b[k] + Σ_t Σ_c W[t,k,c] · x[n, c, i + oy_t, j + ox_t]   (0 outside)

where W[t,k,c] = w_b[k,c,p,q].  The same kn2row and flipped-kernel lowerings as
``atrous_conv``'s ``cpu_v3``, but over all T taps at once:

    forward:   Z = W2d @ x2d           one GEMM with T·K rows (W2d: (T·K, C), x2d: (C, pixels))
               y[k,i,j] += Z[(t,k), i + oy_t, j + ox_t]      for every t, where inside the map
    backward:  D[(t,k), u, v] = dy[k, u − oy_t, v − ox_t]    (0 outside): the dy values that
                                                             met pixel (u, v) through tap t
               dx2d = W2dᵀ @ D         one GEMM: all branches' contributions to dx, summed
               dW2d = D @ x2dᵀ         one GEMM: every branch's weight gradient
               db_b = Σ_{n,i,j} dy     the same for every branch

Branch by branch (the ``"sum"`` variant, the plain version) the same work takes four GEMMs of
K·9 rows each way and three more passes over dx to sum them.  One more saving: a tap whose
offset is at least the map's size (|oy| ≥ H or |ox| ≥ W) reads only padding — its outputs are
all zero and its weight gradient is exactly zero — so it is left out of W2d (at rate 24 on a
21×21 map only each branch's centre tap is left).

Shapes: x (N, C, H, W); weights: B arrays (K, C, kh, kw), kh and kw odd; biases: B arrays (K,)
or None; rates: B ints ≥ 1.  y, dy: (N, K, H, W).

Variants: ``"sum"`` — ``atrous_conv.conv2d_forward``/``conv2d_backward`` per branch, on any
device (the reference the other is tested against); ``"stacked"`` — the one-convolution form
above (CPU).  Both end in the same sums up to float rounding.
"""
import numpy as np
from numba import prange

from tinydeeplab.backend import array_module, on_gpu

from . import atrous_conv, parallel_njit
from .atrous_conv import _matmul_nt, _workspace

# One GEMM over the pixels of several images (x moved to (C, images·pixels)) while a map has
# at most this many pixels; larger maps go one image at a time.  The same rule as cpu_v3's
# flipped-kernel backward (``atrous_conv._flipped_conv_backward``).
CHUNK_MAX_PIXELS = 2048


def check_aspp_args(x, weights, biases, rates, dy=None):
    """Validate the branches; return rates as ints and biases as a list (None entries)."""
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"aspp: x must be 4-D (N, C, H, W), got shape {np.shape(x)}")
    weights, rates = list(weights), list(rates)
    if not weights:
        raise ValueError("aspp: weights must hold at least one branch, got none")
    if len(rates) != len(weights):
        raise ValueError(f"aspp: rates must give one rate per branch: {len(weights)} "
                         f"weights but rates {rates}")
    biases = [None] * len(weights) if biases is None else list(biases)
    if len(biases) != len(weights):
        raise ValueError(f"aspp: biases must be None or one per branch: {len(weights)} "
                         f"weights but {len(biases)} biases")
    K = None
    for b, (w, bias, rate) in enumerate(zip(weights, biases, rates)):
        if getattr(w, "ndim", None) != 4:
            raise ValueError(f"aspp: weights[{b}] must be 4-D (K, C, kh, kw), got shape "
                             f"{np.shape(w)}")
        K = w.shape[0] if K is None else K
        if w.shape[0] != K or w.shape[1] != x.shape[1]:
            raise ValueError(f"aspp: weights[{b}] has shape {w.shape}, expected "
                             f"({K}, {x.shape[1]}, kh, kw): every branch maps x's "
                             f"{x.shape[1]} channels to the same K")
        if w.shape[2] % 2 == 0 or w.shape[3] % 2 == 0:
            raise ValueError(f"aspp: weights[{b}] has an even kernel {w.shape[2:]}: "
                             "'same' padding needs odd kernel sizes")
        if w.dtype != x.dtype or x.dtype not in (np.float32, np.float64):
            raise ValueError(f"aspp: x and weights[{b}] must both be float32 or both "
                             f"float64, got {x.dtype} and {w.dtype}")
        if bias is not None and (bias.shape != (K,) or bias.dtype != x.dtype):
            raise ValueError(f"aspp: biases[{b}] must have shape ({K},) and dtype "
                             f"{x.dtype}, got {bias.shape} {bias.dtype}")
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate < 1:
            raise ValueError(f"aspp: rates[{b}] must be an int ≥ 1, got {rate!r}")
    if dy is not None:
        expected = (x.shape[0], K, *x.shape[2:])
        if tuple(dy.shape) != expected or dy.dtype != x.dtype:
            raise ValueError(f"aspp_backward: dy has shape {dy.shape} {dy.dtype}, expected "
                             f"{expected} {x.dtype}")
    return [int(r) for r in rates], biases


def _padding(shape, rate):
    """The 'same' padding of a (K, C, kh, kw) kernel at ``rate``."""
    return rate * (shape[2] - 1) // 2, rate * (shape[3] - 1) // 2


def live_taps(weight_shapes, rates, H, W):
    """The taps that read the map somewhere: a list of (branch, p, q, oy, ox)."""
    taps = []
    for b, (shape, rate) in enumerate(zip(weight_shapes, rates)):
        ph, pw = _padding(shape, rate)
        for p in range(shape[2]):
            for q in range(shape[3]):
                oy, ox = p * rate - ph, q * rate - pw
                if abs(oy) < H and abs(ox) < W:
                    taps.append((b, p, q, oy, ox))
    return taps


# ---- the plain version: branch by branch ------------------------------------------------------
def _sum_forward(x, weights, biases, rates):
    y = None
    for w, b, r in zip(weights, biases, rates):
        yb = atrous_conv.conv2d_forward(x, w, b, 1, _padding(w.shape, r), r)
        y = yb if y is None else y + yb
    return y


def _sum_backward(x, weights, dy, rates, need_dx):
    dx, dws, dbs = None, [], []
    for w, r in zip(weights, rates):
        dxb, dw, db = atrous_conv.conv2d_backward(x, w, dy, 1, _padding(w.shape, r), r,
                                                  need_dx=need_dx)
        if need_dx:
            dx = dxb if dx is None else dx + dxb
        dws.append(dw)
        dbs.append(db)
    return dx, dws, dbs


# ---- the one-convolution form (CPU) -----------------------------------------------------------
def _add_shifted(z, y, oy, ox):
    # y[n,k,i,j] += Σ_t z[(t,k), n, i + oy[t], j + ox[t]] where that pixel is inside the map
    nb, K, H, W = y.shape
    for nk in prange(nb * K):  # one output plane per iteration: no two write the same pixel
        n, k = nk // K, nk % K
        for t in range(len(oy)):
            i0, i1 = max(0, -oy[t]), min(H, H - oy[t])
            j0, j1 = max(0, -ox[t]), min(W, W - ox[t])
            for i in range(i0, i1):
                y[n, k, i, j0:j1] += z[t * K + k, n, i + oy[t], j0 + ox[t]:j1 + ox[t]]


def _gather_shifted(dy, d, oy, ox):
    # d[(t,k), n, u, v] = dy[n, k, u − oy[t], v − ox[t]], 0 where that pixel is outside
    nb, K, H, W = dy.shape
    for tk in prange(len(oy) * K):
        t, k = tk // K, tk % K
        u0, u1 = max(0, oy[t]), min(H, H + oy[t])
        v0, v1 = max(0, ox[t]), min(W, W + ox[t])
        for n in range(nb):
            d[tk, n] = 0
            for u in range(u0, u1):
                d[tk, n, u, v0:v1] = dy[n, k, u - oy[t], v0 - ox[t]:v1 - ox[t]]


_add_shifted_cpu = parallel_njit(_add_shifted)
_gather_shifted_cpu = parallel_njit(_gather_shifted)


def _stacked_weights(weights, taps):
    """W2d: (T·K, C), rows (t, k)."""
    return np.ascontiguousarray(np.stack([weights[b][:, :, p, q] for b, p, q, _, _ in taps]
                                         ).reshape(-1, weights[0].shape[1]))


def _image_chunks(N, H, W, rows, C, itemsize):
    """(n0, n1) chunks of images: several at a time for small maps, as many as keep both
    buffers — the ``rows`` tap planes and x's copy of C channels — within the im2col budget;
    None when one image's tap planes do not fit (then the branches go one by one)."""
    budget = atrous_conv.COLS_BUDGET_BYTES["cpu"]
    if rows * H * W * itemsize > budget:
        return None
    step = 1 if H * W > CHUNK_MAX_PIXELS else \
        max(1, min(N, budget // (max(rows, C) * H * W * itemsize)))
    return [(n0, min(N, n0 + step)) for n0 in range(0, N, step)]


def _pixels_of(a, n0, n1, name):
    """a[n0:n1] (nb, C, H, W) as (C, nb·H·W): a view for one image, else a copy."""
    nb, C, H, W = a[n0:n1].shape
    if nb == 1:
        return a[n0].reshape(C, H * W)
    flat = _workspace.get(name, (C, nb, H, W), a.dtype, np)
    flat[...] = a[n0:n1].transpose(1, 0, 2, 3)
    return flat.reshape(C, nb * H * W)


def _plan(x, weights, rates):
    """What both directions need: the live taps, the image chunks, W2d and the taps' offsets
    (oy, ox); None when one image is too large for the buffers (then go branch by branch)."""
    N, C, H, W = x.shape
    taps = live_taps([w.shape for w in weights], rates, H, W)
    chunks = _image_chunks(N, H, W, len(taps) * weights[0].shape[0], C, x.itemsize)
    if chunks is None:
        return None
    offsets = (np.array([t[3] for t in taps], dtype=np.int64),
               np.array([t[4] for t in taps], dtype=np.int64))
    return taps, chunks, _stacked_weights(weights, taps), offsets


def _stacked_forward(x, weights, biases, rates):
    N, C, H, W = x.shape
    K = weights[0].shape[0]
    plan = _plan(x, weights, rates)
    if plan is None:
        return _sum_forward(x, weights, biases, rates)
    _, chunks, w2d, (oy, ox) = plan
    y = np.empty((N, K, H, W), dtype=x.dtype)
    y[...] = 0
    for b in biases:
        if b is not None:
            y += b.reshape(1, K, 1, 1)
    for n0, n1 in chunks:
        z = _workspace.get("aspp", (len(w2d), (n1 - n0) * H * W), x.dtype, np)
        np.matmul(w2d, _pixels_of(x, n0, n1, "aspp_x"), out=z)
        _add_shifted_cpu(z.reshape(len(w2d), n1 - n0, H, W), y[n0:n1], oy, ox)
    return y


def _stacked_backward(x, weights, dy, rates, need_dx):
    N, C, H, W = x.shape
    K = weights[0].shape[0]
    plan = _plan(x, weights, rates)
    if plan is None:
        return _sum_backward(x, weights, dy, rates, need_dx)
    taps, chunks, w2d, (oy, ox) = plan
    dw2d = np.zeros_like(w2d)
    dx = np.empty_like(x) if need_dx else None
    for n0, n1 in chunks:
        nb = n1 - n0
        d = _workspace.get("aspp", (len(w2d), nb * H * W), x.dtype, np)
        _gather_shifted_cpu(dy[n0:n1], d.reshape(len(w2d), nb, H, W), oy, ox)
        if need_dx and nb == 1:
            np.matmul(w2d.T, d, out=dx[n0].reshape(C, H * W))
        elif need_dx:
            dx[n0:n1] = np.matmul(w2d.T, d).reshape(C, nb, H, W).transpose(1, 0, 2, 3)
        dw2d += _matmul_nt(d, _pixels_of(x, n0, n1, "aspp_x"))
    dws = [np.zeros_like(w) for w in weights]
    for (b, p, q, _, _), rows in zip(taps, dw2d.reshape(len(taps), K, C)):
        dws[b][:, :, p, q] = rows
    db = dy.sum(axis=(0, 2, 3))
    return dx, dws, [db.copy() for _ in weights]


VARIANTS = {
    "sum": (_sum_forward, _sum_backward),
    "stacked": (_stacked_forward, _stacked_backward),
}
DEFAULT = {"cpu": "stacked", "cuda": "sum"}


def _variant(x, variant):
    name = variant or DEFAULT["cuda" if on_gpu(x) else "cpu"]
    if name not in VARIANTS:
        raise ValueError(f"aspp: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    if name == "stacked" and on_gpu(x):
        raise ValueError("aspp: the 'stacked' variant runs on the CPU only; use 'sum' for "
                         "arrays on the GPU")
    return VARIANTS[name]


def aspp_forward(x, weights, biases=None, rates=(6, 12, 18, 24), variant=None):
    """y = Σ_b conv(x, weights[b], rate rates[b], 'same' padding) + biases[b], on arrays."""
    rates, biases = check_aspp_args(x, weights, biases, rates)
    xp = array_module(x)
    x, weights = xp.ascontiguousarray(x), [xp.ascontiguousarray(w) for w in weights]
    return _variant(x, variant)[0](x, weights, biases, rates)


def aspp_backward(x, weights, dy, rates=(6, 12, 18, 24), variant=None, need_dx=True):
    """(dx, [dw_b], [db_b]) for dy = ∂L/∂y; dx is None when ``need_dx`` is False."""
    rates, _ = check_aspp_args(x, weights, None, rates, dy)
    xp = array_module(x)
    x, dy = xp.ascontiguousarray(x), xp.ascontiguousarray(dy)
    weights = [xp.ascontiguousarray(w) for w in weights]
    return _variant(x, variant)[1](x, weights, dy, rates, need_dx)
