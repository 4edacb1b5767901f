"""Lesson 14 — Writing a GPU kernel: threads and blocks, shared-memory tiles, the roofline.

You will learn:
  * how a CUDA kernel is laid out: a grid of blocks of threads, each thread finding its work
    from its indices — and the naive atrous convolution, one thread per output element;
  * how to count what a kernel reads from global memory, and what arithmetic intensity
    (FLOPs per byte read) says about its speed: the roofline of the machine;
  * the implicit GEMM: the convolution as the matrix product Y = W · X_col without ever
    building X_col, each entry computed by the im2col index math as it is loaded;
  * tiling: a block loads a TILE × TILE tile of each matrix into shared memory once, and each
    value is used TILE times — the library's `cuda_v3`, built up here step by step;
  * where each variant lands on the roofline, and (on a GPU only) how fast they run against
    cuDNN through PyTorch.

Without a GPU the kernels run on Numba's CUDA simulator (every thread a Python thread), on tiny
shapes: it checks the logic and counts the loads; it cannot time anything.

Run:  python lessons/14_writing_a_gpu_kernel.py   (TDL_FAST=1 for a smaller, quicker run)
"""
# %% Setup — without a GPU, CUDA kernels run on Numba's simulator (chosen before numba.cuda loads)
import math
import os
import time

from tinydeeplab import exercises, lessons

GPU = lessons.gpu_or_simulator()
if GPU:
    import cupy

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

from tinydeeplab.kernels import atrous_conv  # noqa: E402

FAST = lessons.fast()  # TDL_FAST=1: a smaller run (the test suite's smoke test)
OUT = lessons.output_dir()  # figures and runs: $TDL_OUT, else ./lesson_out
rng = np.random.default_rng(0)
print("running on", "a GPU: " + cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
      if GPU else "Numba's CUDA simulator (no GPU): logic and counts only, no timings")

# %% 1. A grid of blocks of threads
# A kernel is one function run by many threads.  They are launched as a grid of blocks
# (kernel[blocks, threads_per_block](...)); the threads of one block run on one streaming
# multiprocessor, can share a small fast memory (shared memory) and wait for each other
# (cuda.syncthreads()).  Each thread knows its block and its place in it and derives from
# them which piece of the work is its own: t = blockIdx.x · blockDim.x + threadIdx.x
# (cuda.grid(1)).  A thread whose t falls past the end does nothing.


@cuda.jit
def who_am_i(out):
    t = cuda.grid(1)
    if t < out.shape[0]:
        out[t, 0] = cuda.blockIdx.x
        out[t, 1] = cuda.threadIdx.x
        out[t, 2] = t


ids = cuda.to_device(np.zeros((10, 3), np.int32))
who_am_i[3, 4](ids)  # 3 blocks of 4 threads for 10 elements: the last 2 threads idle
ids = ids.copy_to_host()
print("element: (block, thread) ->", ", ".join(f"{t}: ({b}, {i})" for b, i, t in ids))

# %% 2. The naive kernel: one thread per output element
#     y[n,k,i,j] = Σ_{c,p,q} w[k,c,p,q] · x[n, c, i − pad + p·d, j − pad + q·d]   (stride 1)
# Thread t takes the output element t of y (flattened n, k, i, j) and walks every tap.  Each
# multiply-add reads two numbers from global memory (the card's large, slow memory): one
# weight, one pixel.  To see it, this version also counts its reads in `loads` (an atomic add:
# threads may count at once) — the library's kernel is the same without the counter.


@cuda.jit
def conv_naive(x, w, y, pad, d, loads):
    t = cuda.grid(1)
    N, K, Ho, Wo = y.shape
    if t >= N * K * Ho * Wo:
        return
    j, i, k, n = t % Wo, (t // Wo) % Ho, (t // (Wo * Ho)) % K, t // (Wo * Ho * K)
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    acc = numba.float32(0)
    for c in range(C):
        for p in range(w.shape[2]):
            h = i - pad + p * d
            for q in range(w.shape[3]):
                v = j - pad + q * d
                if 0 <= h < H and 0 <= v < W:  # taps in the zero padding read nothing
                    acc += w[k, c, p, q] * x[n, c, h, v]
                    cuda.atomic.add(loads, 0, 2)
    y[n, k, i, j] = acc


def reference(x, w, pad, d):
    """float64 NumPy: one shifted slice of the padded input per tap."""
    K, C, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    Ho, Wo = xp.shape[2] - d * (kh - 1), xp.shape[3] - d * (kw - 1)
    y = np.zeros((x.shape[0], K, Ho, Wo))
    for p in range(kh):
        for q in range(kw):
            y += np.einsum("kc,nchw->nkhw", w[:, :, p, q],
                           xp[:, :, p * d:p * d + Ho, q * d:q * d + Wo])
    return y


# odd sizes on purpose; the simulator runs every thread in Python, so the shape is tiny
N, C, H, W, K, d = (1, 3, 7, 9, 5, 2) if FAST else (1, 6, 11, 13, 10, 2)
pad = d  # "same" size for a 3×3 kernel at rate d
x = rng.standard_normal((N, C, H, W)).astype(np.float32)
w = rng.standard_normal((K, C, 3, 3)).astype(np.float32)
y_ref = reference(x, w, pad, d)
THREADS = 64
count = cuda.to_device(np.zeros(1, np.int64))
y_dev = cuda.device_array((N, K, H, W), np.float32)
conv_naive[math.ceil(y_ref.size / THREADS), THREADS](cuda.to_device(x), cuda.to_device(w),
                                                      y_dev, pad, d, count)
y_naive, naive_loads = y_dev.copy_to_host(), int(count.copy_to_host()[0])
naive_err = float(np.abs(y_naive - y_ref).max())
naive_flops = naive_loads  # 2 reads and 2 FLOPs (multiply, add) per tap inside the image
print(f"naive kernel, {N}×{C}×{H}×{W} → {K} channels, 3×3 at rate {d}: max error against the "
      f"float64 reference {naive_err:.1e}")
print(f"  {naive_flops} FLOPs, {naive_loads} global reads of 4 bytes: intensity "
      f"{naive_flops / (4 * naive_loads):.2f} FLOP/byte")

# %% 3. The roofline: is a kernel limited by arithmetic or by memory?
# A kernel doing F FLOPs while reading B bytes takes at least max(F / peak, B / bandwidth).
# Its speed is bounded by min(peak, intensity × bandwidth), intensity = F / B: the "roofline"
# (Williams, Waterman & Patterson 2009).  The ridge, peak / bandwidth, says how many FLOPs a
# kernel must do per byte to be able to use the arithmetic.  For the H200 this project measures
# on (NVIDIA's datasheet: FP32 without tensor cores 67 TFLOP/s, HBM3e 4.8 TB/s):
PEAK, BANDWIDTH = 67e12, 4.8e12
ridge = PEAK / BANDWIDTH
print(f"H200 ridge: {ridge:.0f} FLOP/byte; the naive kernel at 0.25 FLOP/byte can reach at most "
      f"{0.25 * BANDWIDTH / 1e12:.1f} TFLOP/s = {0.25 * BANDWIDTH / PEAK:.1%} of the peak")
# (Caches soften this — neighbouring threads read overlapping pixels, and L1/L2 serve some
# reads — but a kernel cannot rely on them: it has to reuse data on purpose.)

# %% 4. The implicit GEMM: a matrix product without the matrix
# Lesson 2 turned the convolution into Y = W · X_col: W is K × R (R = C·kh·kw, the weights of
# one output channel in a row), X_col is R × M (M = N·Ho·Wo output positions; column m holds
# the R inputs output m reads) — im2col.  Building X_col costs kh·kw times the input's memory.
# An *implicit* GEMM never builds it: when the product needs X_col[r, m] it computes it from x
# with the same index math:


@cuda.jit(device=True, inline=True)
def x_col(x, r, m, pad, d, Ho, Wo):
    c, p, q = r // 9, (r // 3) % 3, r % 3  # row r = tap (c, p, q) of a 3×3 kernel
    j, i, n = m % Wo, (m // Wo) % Ho, m // (Wo * Ho)  # column m = output (n, i, j)
    h, v = i - pad + p * d, j - pad + q * d
    if 0 <= h < x.shape[2] and 0 <= v < x.shape[3]:
        return x[n, c, h, v]
    return 0  # the zero padding is computed, never stored


# %% 5. Tiles in shared memory: read once, use TILE times
# One output tile of TILE × TILE entries (TILE output channels × TILE positions) is one block,
# one entry per thread.  Walking along R in steps of TILE, the block
#   1. loads a TILE × TILE tile of W and one of X_col into shared memory — each thread one
#      entry of each (so TILE² threads load 2·TILE² numbers together);
#   2. waits for all of them (cuda.syncthreads(): nobody reads a tile before it is complete);
#   3. each thread adds TILE products from the two tiles — read from shared memory, fast;
#   4. waits again before the next step overwrites the tiles.
# Every number loaded from global memory is now used by TILE threads, not one: 2 reads per
# TILE multiply-adds instead of 2 per one, so the intensity rises TILE-fold.
TILE = 8  # the library's cuda_v3 uses 16 (256 threads a block); 8 keeps the simulator quick


@cuda.jit
def conv_tiled(x, w2d, y, pad, d, loads):
    a = cuda.shared.array((TILE, TILE), numba.float32)  # a tile of W
    b = cuda.shared.array((TILE, TILE), numba.float32)  # a tile of X_col
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    K, R = w2d.shape
    N, _, Ho, Wo = y.shape
    M = N * Ho * Wo
    k = cuda.blockIdx.y * TILE + ty  # this thread's output channel ...
    m = cuda.blockIdx.x * TILE + tx  # ... and output position
    acc = numba.float32(0)
    for r0 in range(0, R, TILE):
        a[ty, tx] = 0
        b[ty, tx] = 0
        if k < K and r0 + tx < R:  # 1. load: thread (ty, tx) fetches W[k, r0 + tx] ...
            a[ty, tx] = w2d[k, r0 + tx]
            cuda.atomic.add(loads, 0, 1)
        if r0 + ty < R and m < M:  # ... and X_col[r0 + ty, m]
            b[ty, tx] = x_col(x, r0 + ty, m, pad, d, Ho, Wo)
            cuda.atomic.add(loads, 0, 1)
        cuda.syncthreads()  # 2. the tiles are complete
        for t in range(TILE):  # 3. TILE multiply-adds from shared memory
            acc += a[ty, t] * b[t, tx]
        cuda.syncthreads()  # 4. everyone is done with them
    if k < K and m < M:
        y[m // (Wo * Ho), k, (m // Wo) % Ho, m % Wo] = acc


M, R = N * H * W, C * 9
count = cuda.to_device(np.zeros(1, np.int64))
y_dev = cuda.device_array((N, K, H, W), np.float32)
blocks = (math.ceil(M / TILE), math.ceil(K / TILE))  # x: positions, y: channels
conv_tiled[blocks, (TILE, TILE)](cuda.to_device(x), cuda.to_device(w.reshape(K, R)), y_dev,
                                 pad, d, count)
y_tiled, tiled_loads = y_dev.copy_to_host(), int(count.copy_to_host()[0])
tiled_err = float(np.abs(y_tiled - y_ref).max())


def tiled_reads(K, R, M, tile):
    """The tile entries the tiled kernel fetches: every block reads its rows of W and its
    columns of X_col once, so W is read once per column of blocks, X_col once per row."""
    return K * R * math.ceil(M / tile) + R * M * math.ceil(K / tile)


gemm_flops = 2 * K * R * M  # padding taps included: the GEMM multiplies its zeros too
print(f"tiled kernel (TILE {TILE}, grid {blocks[0]}×{blocks[1]} blocks of {TILE}×{TILE}): max "
      f"error {tiled_err:.1e}")
print(f"  {gemm_flops} FLOPs, {tiled_loads} reads counted (the formula says "
      f"{tiled_reads(K, R, M, TILE)}): intensity {gemm_flops / (4 * tiled_loads):.2f} FLOP/byte")
# With K = 5 or 10 output channels the W tiles are mostly empty, so the gain here is below
# TILE-fold; on a real layer (hundreds of channels) it is close to it (section 7).

# %% 6. The library's kernels on the same input
# atrous_conv's CUDA ladder: cuda_v1 is section 2's kernel, cuda_v3 section 5's (TILE 16,
# stride and any kernel size, and the backward: dW and dX as two more implicit GEMMs — see the
# exercise), cuda_v4 lowers to cuBLAS.  All are checked against the float64 reference here,
# forward and backward (the backward's reference: float64 cpu_v1, the plain loops).
to_dev = cupy.asarray if GPU else np.asarray  # the library takes CuPy arrays, or NumPy ones
to_host = cupy.asnumpy if GPU else np.asarray  # under the simulator
dy = rng.standard_normal(y_ref.shape).astype(np.float32)
dx_ref, dw_ref, _ = atrous_conv.conv2d_backward(x.astype(np.float64), w.astype(np.float64),
                                                dy.astype(np.float64), 1, pad, d,
                                                variant="cpu_v1")
library_err = {}
for variant in ("cuda_v1", "cuda_v3"):
    y_lib = to_host(atrous_conv.conv2d_forward(to_dev(x), to_dev(w), None, 1, pad, d,
                                               variant=variant))
    dx_lib, dw_lib, _ = (to_host(a) for a in atrous_conv.conv2d_backward(
        to_dev(x), to_dev(w), to_dev(dy), 1, pad, d, variant=variant))
    scale = float(np.abs(dw_ref).max())
    library_err[variant] = max(float(np.abs(y_lib - y_ref).max()),
                               float(np.abs(dx_lib - dx_ref).max()),
                               float(np.abs(dw_lib - dw_ref).max()) / scale)
    print(f"{variant}: forward, dx and dw (relative) against the reference, largest error "
          f"{library_err[variant]:.1e}")

# %% 7. Where each variant lands: a DeepLab layer on the roofline
# A 3×3 layer of ResNet-101's last stage at output stride 8: 512 → 512 channels on 41×41 maps,
# batch 10 (the paper's).  Intensities from the read counts above (4-byte reads):
Kl, Rl, Ml = 512, 512 * 9, 10 * 41 * 41
layer_flops = 2 * Kl * Rl * Ml
points = {"naive (v1)": 0.25}
for tile in (8, 16):
    points[f"tiled {tile} (v3 at {tile})"] = layer_flops / (4 * tiled_reads(Kl, Rl, Ml, tile))
# cuBLAS and cuDNN go further: each thread keeps a small block of outputs in registers (say
# 8×8) and a block a 128×128 tile, so each value read serves ~128 products: the intensity
# then passes the ridge and the kernel becomes limited by arithmetic, not memory.
points["register-blocked GEMM (~128×128 tiles)"] = layer_flops / (4 * tiled_reads(Kl, Rl, Ml,
                                                                                  128))
for name, intensity in points.items():
    bound = min(PEAK, intensity * BANDWIDTH)
    print(f"  {name:40s} {intensity:6.2f} FLOP/byte → at most {bound / 1e12:5.1f} TFLOP/s "
          f"({'memory' if bound < PEAK else 'compute'}-bound)")

measured = {}
if GPU:  # timings, only on a real card: the simulator's would mean nothing
    xl = cupy.asarray(rng.standard_normal((10, 512, 41, 41)).astype(np.float32))
    wl = cupy.asarray(rng.standard_normal((512, 512, 3, 3)).astype(np.float32) * 0.02)

    def gpu_time(fn, repeat=5):
        fn()
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        cupy.cuda.Device().synchronize()
        return (time.perf_counter() - start) / repeat

    for variant in ("cuda_v3", "cuda_v4"):
        seconds = gpu_time(lambda: atrous_conv.conv2d_forward(xl, wl, None, 1, 2, 2,
                                                              variant=variant))
        measured[variant] = layer_flops / seconds
    try:
        import torch

        torch.backends.cudnn.allow_tf32 = False  # fp32 against fp32
        xt, wt = torch.as_tensor(xl, device="cuda"), torch.as_tensor(wl, device="cuda")
        seconds = gpu_time(lambda: torch.nn.functional.conv2d(xt, wt, padding=2, dilation=2))
        measured["cuDNN (PyTorch)"] = layer_flops / seconds
    except ImportError:
        print("PyTorch is not installed: no cuDNN comparison")
    for name, flops in measured.items():
        print(f"  measured {name:16s} {flops / 1e12:5.1f} TFLOP/s")
else:
    print("timings need a GPU; on one this cell times cuda_v3, cuda_v4 and cuDNN on this layer")

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7, 4.2))
intensity = np.logspace(-1.5, 3, 200)
ax.loglog(intensity, np.minimum(PEAK, intensity * BANDWIDTH) / 1e12, "k-", lw=2)
ax.axvline(ridge, color="grey", ls=":", lw=1)
for name, value in points.items():
    ax.plot(value, min(PEAK, value * BANDWIDTH) / 1e12, "o", label=name)
for name, flops in measured.items():  # at the intensity of the scheme each one uses
    scheme = "tiled 16 (v3 at 16)" if name == "cuda_v3" else \
        "register-blocked GEMM (~128×128 tiles)"
    ax.plot(points[scheme], flops / 1e12, "x", ms=9, label=f"{name}, measured")
ax.set_xlabel("arithmetic intensity (FLOP per byte read)")
ax.set_ylabel("attainable TFLOP/s (FP32)")
ax.set_title("H200 roofline, 512→512 3×3 layer at batch 10", fontsize=9)
ax.legend(fontsize=7)
fig.savefig(os.path.join(OUT, "14_roofline.png"), dpi=90, bbox_inches="tight")
plt.close(fig)

# %% Check
assert naive_err < 1e-4 and tiled_err < 1e-4, "a kernel disagrees with the float64 reference"
assert naive_flops / (4 * naive_loads) == 0.25
assert tiled_loads == tiled_reads(K, R, M, TILE), "the read count must match the formula"
assert gemm_flops / tiled_loads > naive_flops / naive_loads, "tiles must raise the intensity"
assert max(library_err.values()) < 1e-4
print("Check passed.")

# %% Exercise — the transposed index map (a solution: lessons/solutions/14_writing_a_gpu_kernel.py)
# cuda_v3's dX is one more implicit GEMM:  dX[c, (n,h,v)] = Σ_{(k,p,q)} W[k,c,p,q] ·
# dY_col[(k,p,q), (n,h,v)],  where dY_col holds dy[n, k, i, j] for the output (i, j) that read
# input pixel (h, v) through tap (p, q), and 0 if no output did (with stride s, only when
# h + pad − p·d is a multiple of s).  Write that entry, as a plain function: the check builds
# dX with it and compares with atrous_conv.conv2d_backward, strided and dilated.
def dy_col(dy, r, m, kh, kw, s, pad, d, H, W):
    """Entry (r, m) of dY_col: r = (k, p, q) flattened, m = (n, h, v) flattened; the input is
    H × W."""
    raise NotImplementedError("your code here")


exercises.run(exercises.check_dy_col, dy_col)

# %% Summary — read next
# * A kernel is written for one thread; the grid of blocks maps threads to the work.
# * Arithmetic intensity decides whether memory or arithmetic limits a kernel (the roofline);
#   the naive convolution reads 8 bytes per 2 FLOPs — far left of the ridge.
# * Tiling in shared memory reuses every value read TILE times (syncthreads around the tiles);
#   the implicit GEMM computes the im2col matrix as it loads it, never storing it.
# Next: lesson 15 — the CRF on the GPU.
