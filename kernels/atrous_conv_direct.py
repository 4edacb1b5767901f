"""Direct convolution with its outputs held in registers: ``cpu_v7``'s rung for small layers.

im2col + GEMM (``cpu_v2``-``cpu_v6``) first writes every receptive field out as a column
(C·kh·kw numbers per output pixel), then hands the columns to the GEMM.  For a layer with few
input channels that copy costs more than the arithmetic: the tiny network's 7×7 stem writes
15 MB of columns for 0.12 GFLOP.  A GEMM kernel is fast for another reason, too: it keeps a
block of its outputs in registers and streams its inputs past them.  This rung does the same
without the columns, reading the receptive fields straight from the (padded) image:

    y[n, k, i, j0 + r] = Σ_t  xp[n, c_t, i·s + p_t·d, (j0 + r)·s + q_t·d] · w[k, c_t, p_t, q_t]

for a block of R = ``BLOCK`` neighbouring outputs of one row (r = 0 … R − 1) and a block of
``LANES`` output channels k, over the taps t = (c, p, q) in im2col's row order.  xp is x with its
zero padding written out, so every read is inside the array.  The R × LANES sums are R vector
registers (16 float32 lanes with AVX-512, 8 with AVX2); each tap loads one vector of weights
w[k0 : k0 + LANES, c_t, p_t, q_t] and, for each r, one pixel broadcast to all lanes, and adds
their product to the r-th register with one fused multiply-add.  In memory, per tap: R + 1
loads for R·LANES multiply-adds — im2col + GEMM reads and writes every column number twice.

Two versions of that block, one driver (``forward``):

    "plain"  the block as three loops over taps, outputs and lanes (``_block_plain``): the
             algorithm in readable Python, which the compiler keeps in memory, not registers
    "simd"   the same loops written in LLVM's vector instructions (``_block_simd``): R
             accumulators the compiler keeps in registers, one FMA per tap and output

Both add the taps one after another, from zero, and agree with the reference to float32
rounding; "simd" fuses each multiply and add into one rounding.  The rung pays where C·kh·kw
is small (``pays``); above that im2col's columns are cheap next to the arithmetic and the
GEMM's blocking wins.

The same block gives the weight gradient of a 7×7 stem, whose input (the image) needs none
(``weight_gradient``):

    dw[k, c, p, q] = Σ_{n,i,j} dy[n, k, i, j] · xp[n, c, i·s + p·d, j·s + q·d]

A kernel row (c, p) has BLOCK = 7 taps q, spaced d apart like a block's 7 outputs; so the
block's outputs become the row's taps, its taps the output pixels j of one image row (the
pixel spread over the lanes), and its weight vectors dy's channels at those pixels (dy copied
channels last).  Each image row's sums are added to the image's, and the images' in order.
"""
import numba
import numpy as np
from llvmlite import binding, ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import parallel_njit


def _target_features():
    """The CPU features the compiler targets (NUMBA_CPU_FEATURES, else the host's)."""
    features = numba.config.CPU_FEATURES or binding.get_host_cpu_features().flatten()
    return set(features.split(","))


_FEATURES = _target_features()
LANES = 16 if "+avx512f" in _FEATURES else 8  # float32 lanes of the widest vectors
_HAS_FMA = "+fma" in _FEATURES
BLOCK = 7  # R: outputs per block.  7 accumulators, a weight vector and a broadcast fit in
#            AVX2's 16 registers; machine C (AVX-512), the tiny model's layers, R = 6-20:
#            7 was fastest or within 5 % of it on each.
# C·kh·kw up to which the rung is taken (``pays``).  Forward against cpu_v6, machine C, in turns
# (benchmarks/bench_conv_rules.py): 0.53-0.75 on the 3-32-channel layers (≤ 288 taps), 0.75 and
# 0.86 on the tiny network's 64-channel ones (576), 1.2 on its 128-channel ones (1152).
MAX_TAPS = 576
_i64 = ir.IntType(64)


def _block_plain(x, base, step, offsets, wt, out, j0):
    # out[j0 + r, :] = Σ_t x[base + offsets[t] + r·step] · wt[t, :], the taps in order
    R, L = BLOCK, wt.shape[1]
    for r in range(R):
        for k in range(L):
            out[j0 + r, k] = 0
    for t in range(offsets.shape[0]):
        at = base + offsets[t]
        for r in range(R):
            pixel = x[at + r * step]
            for k in range(L):
                out[j0 + r, k] += pixel * wt[t, k]


@intrinsic
def _block_simd(typingctx, x, base, step, offsets, wt, out, j0):
    """``_block_plain`` in LLVM's vector instructions: R accumulators of wt's row length
    (LANES float32), one fused multiply-add per tap and output."""
    floats = [a for a in (x, wt, out) if isinstance(a, types.Array) and a.layout == "C"
              and a.dtype == types.float32]
    if len(floats) < 3 or not isinstance(offsets, types.Array) or \
            offsets.dtype != types.int64 or offsets.layout != "C":
        return None  # a typing error: the code below reads contiguous float32 rows
    sig = types.void(x, base, step, offsets, wt, out, j0)

    def codegen(context, builder, signature, args):
        x_, base_, step_, offsets_, wt_, out_, j0_ = args
        xs, offs, ws, outs = (context.make_array(signature.args[i])(context, builder, a)
                              for i, a in ((0, x_), (3, offsets_), (4, wt_), (5, out_)))
        vector = ir.VectorType(ir.FloatType(), LANES)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{LANES}f32")
        all_zero = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
        sums = [cgutils.alloca_once_value(builder, ir.Constant(vector, [0.0] * LANES))
                for _ in range(BLOCK)]  # promoted to registers by the optimiser
        with cgutils.for_range(builder, builder.extract_value(offs.shape, 0)) as loop:
            t = loop.index
            at = builder.add(base_, builder.load(builder.gep(offs.data, [t])))
            row = builder.gep(ws.data, [builder.mul(t, ir.Constant(_i64, LANES))])
            weights = builder.load(builder.bitcast(row, vector.as_pointer()), align=4)
            for r in range(BLOCK):
                where = builder.add(at, builder.mul(step_, ir.Constant(_i64, r)))
                pixel = builder.load(builder.gep(xs.data, [where]))
                one = builder.insert_element(ir.Constant(vector, ir.Undefined), pixel,
                                             ir.Constant(ir.IntType(32), 0))
                pixels = builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), all_zero)
                builder.store(builder.call(fma, [pixels, weights, builder.load(sums[r])]),
                              sums[r])
        for r in range(BLOCK):
            at = builder.mul(builder.add(j0_, ir.Constant(_i64, r)), ir.Constant(_i64, LANES))
            target = builder.bitcast(builder.gep(outs.data, [at]), vector.as_pointer())
            builder.store(builder.load(sums[r]), target, align=4)
        return context.get_dummy_value()

    return sig, codegen


_block_plain_cpu = njit(_block_plain)


def _pad(x, xp, ph, pw):
    # xp[n, c] = x[n, c] with ph zero rows above and below, pw zero columns left and right
    N, C, H, W = x.shape
    Wp = xp.shape[3]
    for plane in prange(N * C):
        n, c = plane // C, plane % C
        for i in range(xp.shape[2]):
            if i < ph or i >= ph + H:
                for j in range(Wp):
                    xp[n, c, i, j] = 0
            else:
                for j in range(pw):
                    xp[n, c, i, j] = 0
                for j in range(W):
                    xp[n, c, i, pw + j] = x[n, c, i - ph, j]
                for j in range(pw + W, Wp):
                    xp[n, c, i, j] = 0


def _rows(xp, offsets, wt, y, sh, sw, simd):
    # every output row (n, i) for every block of LANES channels: blocks of R outputs along
    # the row (the last one ending at the row's end, overlapping the one before), then the
    # row's (Wo, LANES) sums copied out to the LANES planes
    N, K, Ho, Wo = y.shape
    C, Hp, Wp = xp.shape[1], xp.shape[2], xp.shape[3]
    groups, L, R = wt.shape[0], wt.shape[2], BLOCK
    flat = xp.reshape(-1)
    for job in prange(N * Ho * groups):
        n, i, g = job // (Ho * groups), (job // groups) % Ho, job % groups
        out = np.empty((Wo, L), y.dtype)
        for b in range((Wo + R - 1) // R):
            j0 = min(b * R, Wo - R)
            base = (n * C * Hp + i * sh) * Wp + j0 * sw
            if simd:
                _block_simd(flat, base, sw, offsets, wt[g], out, j0)
            else:
                _block_plain_cpu(flat, base, sw, offsets, wt[g], out, j0)
        for k in range(L):
            for j in range(Wo):
                y[n, g * L + k, i, j] = out[j, k]


def _weight_rows(xp, columns, dyt, partial, sh, dh, dw_, simd):
    # partial[n, k, c, p, q] = Σ_{i,j} xp[n, c, i·sh + p·dh, j·sw + q·dw_] · dy[n, k, i, j] for
    # every kernel row (c, p) — exactly BLOCK taps q — and block of LANES channels k: the
    # block above with a row's output pixels as its taps (columns[j] = j·sw) and the kernel
    # row's taps as its outputs; each row's sums added to the image's, row by row
    N, K, C, kh, R = partial.shape
    Hp, Wp = xp.shape[2], xp.shape[3]
    groups, Ho, L = dyt.shape[0], dyt.shape[2], dyt.shape[4]
    flat = xp.reshape(-1)
    for job in prange(N * C * kh * groups):
        n, rest = job // (C * kh * groups), job % (C * kh * groups)
        c, p, g = rest // (kh * groups), (rest // groups) % kh, rest % groups
        row = np.empty((R, L), partial.dtype)
        image = np.zeros((R, L), partial.dtype)
        for i in range(Ho):
            base = ((n * C + c) * Hp + i * sh + p * dh) * Wp
            if simd:
                _block_simd(flat, base, dw_, columns, dyt[g, n, i], row, 0)
            else:
                _block_plain_cpu(flat, base, dw_, columns, dyt[g, n, i], row, 0)
            for q in range(R):
                for k in range(L):
                    image[q, k] += row[q, k]
        for k in range(L):
            for q in range(R):
                partial[n, g * L + k, c, p, q] = image[q, k]


_pad_cpu = parallel_njit(_pad)
_rows_cpu = parallel_njit(_rows)
_weight_rows_cpu = parallel_njit(_weight_rows)


def pays(w_shape, dtype, Wo):
    """Whether ``cpu_v7`` takes this forward (where Winograd does not pay: atrous_conv checks
    that first): float32, output channels in whole blocks of LANES, more than one tap per
    channel and at most MAX_TAPS in all (C·kh·kw), rows of at least BLOCK outputs, a CPU with
    fused multiply-add, and compiled code (plain Python cannot run the intrinsic).  1×1
    kernels have no columns to save: their GEMM reads x itself, and took 0.5-0.7 of this
    rung's time (machine C, 32-64 channels)."""
    K, C, kh, kw = w_shape
    return (dtype == np.float32 and K % LANES == 0 and 1 < kh * kw and
            C * kh * kw <= MAX_TAPS and Wo >= BLOCK and _HAS_FMA and
            not numba.config.DISABLE_JIT)


def _check_block(block):
    if block not in ("simd", "plain"):
        raise ValueError(f"direct conv: block must be 'simd' or 'plain', got {block!r}")


def _padded(x, ph, pw, buffer):
    """x with ph zero rows and pw zero columns on each side, in ``buffer("direct_xp", ...)``
    (the caller's reusable buffer) or a fresh array."""
    N, C, H, W = x.shape
    shape = (N, C, H + 2 * ph, W + 2 * pw)
    xp = buffer("direct_xp", shape, x.dtype) if buffer else np.empty(shape, x.dtype)
    _pad_cpu(x, xp, ph, pw)
    return xp


def forward(x, w, b, stride, padding, dilation, block="simd", buffer=None):
    """y = conv(x, w) + b by the register-blocked direct loops; ``block`` "simd" or "plain".
    x, w float32 and C-contiguous; stride, padding, dilation (h, w) pairs; K a multiple of
    LANES and Wo ≥ BLOCK.  ``buffer(name, shape, dtype)`` supplies the padded copy."""
    _check_block(block)
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if K % LANES or Wo < BLOCK or x.dtype != np.float32 or w.dtype != np.float32:
        raise ValueError(f"direct conv: needs float32, K a multiple of {LANES} and at least "
                         f"{BLOCK} outputs a row; got K={K}, Wo={Wo}, {x.dtype}/{w.dtype}")
    xp = _padded(x, ph, pw, buffer)
    Hp, Wp = xp.shape[2:]
    c, p, q = np.meshgrid(np.arange(C), np.arange(kh), np.arange(kw), indexing="ij")
    offsets = ((c * Hp + p * dh) * Wp + q * dw).ravel().astype(np.int64)  # im2col's row order
    wt = np.ascontiguousarray(w.reshape(K // LANES, LANES, C * kh * kw).transpose(0, 2, 1))
    y = np.empty((N, K, Ho, Wo), x.dtype)
    _rows_cpu(xp, offsets, wt, y, sh, sw, block == "simd")
    if b is not None:
        y += b.reshape(1, K, 1, 1)
    return y


def weight_gradient_pays(w_shape, dtype):
    """Whether ``cpu_v7`` takes dw by ``weight_gradient`` for an input that needs no gradient
    (the image, under the stem): kernel rows of exactly BLOCK taps (the 7×7 stems), output
    channels in whole blocks of LANES, float32, FMA, compiled code."""
    K, C, kh, kw = w_shape
    return (dtype == np.float32 and K % LANES == 0 and kw == BLOCK and _HAS_FMA and
            not numba.config.DISABLE_JIT)


def weight_gradient(x, dy, kh, stride, padding, dilation, block="simd", buffer=None):
    """dw (K, C, kh, BLOCK) for y = conv(x, w) and dy = ∂L/∂y, by the same register block as
    ``forward``: a kernel row's BLOCK taps are the block's outputs, the output pixels its
    taps (added in order: image, row, column), dy's LANES channels at a pixel its weight
    vector.  So no im2col: the 7×7 stem's weight gradient without its 15 MB of columns."""
    _check_block(block)
    N, C, H, W = x.shape
    K, Ho, Wo = dy.shape[1:]
    (sh, sw), (ph, pw), (dh, dw_) = stride, padding, dilation
    if K % LANES or x.dtype != np.float32 or dy.dtype != np.float32:
        raise ValueError(f"direct conv weight gradient: needs float32 and K a multiple of "
                         f"{LANES}; got K={K}, {x.dtype}/{dy.dtype}")
    xp = _padded(x, ph, pw, buffer)
    columns = np.arange(Wo, dtype=np.int64) * sw
    dyt = np.ascontiguousarray(  # (groups, N, Ho, Wo, LANES): dy's channels last
        dy.reshape(N, K // LANES, LANES, Ho, Wo).transpose(1, 0, 3, 4, 2))
    partial = np.empty((N, K, C, kh, BLOCK), x.dtype)
    _weight_rows_cpu(xp, columns, dyt, partial, sh, dh, dw_, block == "simd")
    dw = partial[0].copy()
    for n in range(1, N):  # the images' sums, in order
        dw += partial[n]
    return dw
