"""Lesson 2 — Writing the atrous convolution kernel: loops, im2col with holes, GEMM, backward.

You will learn:
  * the direct definition as loops, and why nobody runs it;
  * im2col "with holes": gathering dilated receptive fields into a matrix so that the whole
    convolution is one matrix product (how DeepLab's Caffe code does it);
  * that the CPU (Numba) and CUDA (numba.cuda) kernels share one piece of index math;
  * how to derive the backward (db, dw, dx = col2im of a matrix product) and check it with an
    adjoint identity and finite differences;
  * how our kernel compares with PyTorch's on the same input;
  * Winograd's minimal filtering, F(2×2, 3×3) and F(4×4, 3×3), on one tile, and what the
    larger one's matrices cost in float32 rounding.

Run:  python lessons/02_writing_the_kernel.py   (TDL_FAST=1 for a smaller, quicker run)
"""
# %% Setup — without a GPU, CUDA kernels run on Numba's simulator (chosen before numba.cuda loads)
import os
import time

from tinydeeplab import lessons

GPU = lessons.gpu_or_simulator()
if GPU:
    import cupy

import numpy as np  # noqa: E402

import tinydeeplab.functional as F  # noqa: E402
from tinydeeplab import Tensor, exercises, gradcheck  # noqa: E402
from tinydeeplab.kernels import atrous_conv, atrous_conv_cpu  # noqa: E402

FAST = lessons.fast()  # TDL_FAST=1: a smaller run (the test suite's smoke test)
OUT = lessons.output_dir()  # figures and runs: $TDL_OUT, else ./lesson_out
rng = np.random.default_rng(0)

# %% 1. The definition as loops (float64: this is our reference)
#     y[n,k,i,j] = b[k] + Σ_{c,p,q} w[k,c,p,q] · x[n, c, i·s − pad + p·d, j·s − pad + q·d]
# Seven nested loops; Python runs ~10⁷ of these multiply-adds a second, a ResNet layer needs 10⁹.
N, C, H, W, K, d, s, pad = 2, 3, 9, 11, 4, 2, 1, 2


def conv_loops(x, w, b, s, pad, d):
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    Ho = (H + 2 * pad - d * (kh - 1) - 1) // s + 1
    Wo = (W + 2 * pad - d * (kw - 1) - 1) // s + 1
    y = np.zeros((N, K, Ho, Wo))
    for n in range(N):
        for k in range(K):
            for i in range(Ho):
                for j in range(Wo):
                    acc = b[k]
                    for c in range(C):
                        for p in range(kh):
                            for q in range(kw):
                                h, v = i * s - pad + p * d, j * s - pad + q * d
                                if 0 <= h < H and 0 <= v < W:  # zero padding
                                    acc += w[k, c, p, q] * x[n, c, h, v]
                    y[n, k, i, j] = acc
    return y


x = rng.standard_normal((N, C, H, W))
w = rng.standard_normal((K, C, 3, 3))
b = rng.standard_normal(K)
y_loops = conv_loops(x, w, b, s, pad, d)
print("output shape", y_loops.shape)

# %% 2. im2col with holes, then one GEMM
# Row (c, p, q) of the column matrix holds, for every output position (n, i, j), the input pixel
# that tap (p, q) of channel c reads: a strided slice of the zero-padded input starting p·d rows
# and q·d columns in.  Then  y2d (K, N·Ho·Wo) = w2d (K, C·9) @ cols (C·9, N·Ho·Wo)  — all the
# arithmetic in one BLAS call, which runs near the machine's peak FLOP rate.


def im2col(x, kh, kw, s, pad, d):
    N, C, H, W = x.shape
    Ho = (H + 2 * pad - d * (kh - 1) - 1) // s + 1
    Wo = (W + 2 * pad - d * (kw - 1) - 1) // s + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = np.empty((C, kh, kw, N, Ho, Wo))
    for p in range(kh):
        for q in range(kw):
            cols[:, p, q] = xp[:, :, p * d: p * d + s * (Ho - 1) + 1: s,
                               q * d: q * d + s * (Wo - 1) + 1: s].transpose(1, 0, 2, 3)
    return cols.reshape(C * kh * kw, N * Ho * Wo), (Ho, Wo)


cols, (Ho, Wo) = im2col(x, 3, 3, s, pad, d)
y_gemm = (w.reshape(K, -1) @ cols + b[:, None]).reshape(K, N, Ho, Wo).transpose(1, 0, 2, 3)
# the library's Numba im2col builds the same matrix (for output rows 0..Ho of every image)
cols_lib = atrous_conv_cpu.im2col_dilated(x, w.shape, (s, s), (pad, pad), (d, d), 0, Ho, Wo)
print("im2col + GEMM vs loops, max |difference|:", np.abs(y_gemm - y_loops).max())
print("our im2col vs the library's:", np.abs(cols - cols_lib).max())

import matplotlib.pyplot as plt  # noqa: E402

tiny = np.arange(1, 7 * 7 + 1, dtype=np.float64).reshape(1, 1, 7, 7)
fig, ax = plt.subplots(1, 2, figsize=(10, 3), gridspec_kw={"width_ratios": [1, 4]})
ax[0].imshow(tiny[0, 0], cmap="viridis")
ax[0].set_title("input 7×7 (pixel values 1..49)", fontsize=9)
ax[1].imshow(im2col(tiny, 3, 3, 1, 2, 2)[0], cmap="viridis", aspect="auto")
ax[1].set_title("im2col, 3×3 at rate 2, pad 2: 9 rows (taps) × 49 columns (outputs); "
                "dark = zero padding", fontsize=9)
ax[1].set_ylabel("tap (p, q)")
ax[1].set_xlabel("output position (i, j)")
fig.savefig(os.path.join(OUT, "02_im2col_with_holes.png"), dpi=90, bbox_inches="tight")
plt.close(fig)

# %% 3. One piece of index math, two devices
# Both the CPU teaching kernel (v1) and the CUDA one compute the input row of tap p as
# i·s − pad + p·d.  The CUDA kernel is the body of the CPU loops with the outer loops replaced
# by the thread index: t = cuda.grid(1) → (n, k, i, j).
for name, variant in [("CPU  (Numba, prange)", "cpu_v1"), ("CUDA (numba.cuda)   ", "cuda_v1")]:
    source = atrous_conv.kernel_source(variant)
    line = next(ln for ln in source.splitlines() if "p * dh" in ln)
    print(f"{name}: {line.strip()}")
x32, w32 = x.astype(np.float32), w.astype(np.float32)
y_cpu = atrous_conv.conv2d_forward(x32, w32, b.astype(np.float32), s, pad, d, variant="cpu_v1")
x_dev = cupy.asarray(x32) if GPU else x32  # the simulator runs CUDA kernels on NumPy arrays
w_dev = cupy.asarray(w32) if GPU else w32
b_dev = cupy.asarray(b.astype(np.float32)) if GPU else b.astype(np.float32)
y_cuda = atrous_conv.conv2d_forward(x_dev, w_dev, b_dev, s, pad, d, variant="cuda_v1")
y_cuda = y_cuda.get() if GPU else y_cuda
print(f"CUDA v1 ({'GPU' if GPU else 'simulator'}) vs CPU v1: {np.abs(y_cuda - y_cpu).max():.2e}")

# %% 4. The backward
# With y2d = w2d @ cols + b and dy2d = ∂L/∂y2d, the matrix-product rule gives
#     db = Σ over positions of dy2d,   dw2d = dy2d @ colsᵀ,   dcols = w2dᵀ @ dy2d,
# and dx = col2im(dcols): every column entry goes back, *added*, to the pixel im2col copied it
# from (a pixel read by several taps collects several contributions).  col2im is the transpose
# of im2col — so  ⟨im2col(x), c⟩ = ⟨x, col2im(c)⟩  for any x and c, which we check.


def col2im(dcols, x_shape, kh, kw, s, pad, d):
    N, C, H, W = x_shape
    Ho = (H + 2 * pad - d * (kh - 1) - 1) // s + 1
    Wo = (W + 2 * pad - d * (kw - 1) - 1) // s + 1
    dxp = np.zeros((N, C, H + 2 * pad, W + 2 * pad))
    dc = dcols.reshape(C, kh, kw, N, Ho, Wo)
    for p in range(kh):
        for q in range(kw):
            dxp[:, :, p * d: p * d + s * (Ho - 1) + 1: s,
                q * d: q * d + s * (Wo - 1) + 1: s] += dc[:, p, q].transpose(1, 0, 2, 3)
    return dxp[:, :, pad: pad + H, pad: pad + W]


dy = rng.standard_normal(y_loops.shape)
dy2d = dy.transpose(1, 0, 2, 3).reshape(K, -1)
db = dy2d.sum(1)
dw = (dy2d @ cols.T).reshape(w.shape)
dx = col2im(w.reshape(K, -1).T @ dy2d, x.shape, 3, 3, s, pad, d)
dx_lib, dw_lib, db_lib = atrous_conv.conv2d_backward(x, w, dy, s, pad, d)
c_any = rng.standard_normal(cols.shape)
adjoint = (cols * c_any).sum() - (x * col2im(c_any, x.shape, 3, 3, s, pad, d)).sum()
print("backward vs library: dx", np.abs(dx - dx_lib).max(), " dw", np.abs(dw - dw_lib).max(),
      " db", np.abs(db - db_lib).max())
print("adjoint identity ⟨im2col(x), c⟩ − ⟨x, col2im(c)⟩ =", adjoint)

# finite differences through the autograd op, every element (float64)
xt = Tensor(x[:1, :2, :7, :6].copy(), requires_grad=True)
wt = Tensor(w[:3, :2].copy(), requires_grad=True)
grad_ok = gradcheck(lambda x, w: F.conv2d(x, w, padding=2, dilation=2), [xt, wt])
print("gradcheck of F.conv2d (dilation 2):", grad_ok)

# %% 5. Speed against PyTorch (same input, same threads; timings are noisy — see benchmarks/)
# Two shapes of one layer (N, C, H, W) = (4, 128, 65, 65), 128 filters (in fast mode a tiny one,
# where fixed per-call costs dominate):
# at rate 2, like the dilated 3×3s of DeepLab's backbone, and at rate 12, like an ASPP branch.
# benchmarks/bench_conv.py measures DeepLab's layer shapes (RESULTS.md: their median); a single
# shape can sit far from it.  PyTorch's CPU time for dilated convolutions varies much more with
# the rate than ours (ours does the same arithmetic at every rate; in bench_conv's ASPP rows
# PyTorch takes 10-55 ms for the same work at different rates), so the rate-12 ratio below is
# PyTorch's choice of algorithm as much as our speed.  Ours runs its GEMMs in OpenBLAS (by
# im2col, or for a layer as large as the full-size one here by Winograd, section 6): its speed
# depends on which of OpenBLAS's kernels runs (printed below).  The benchmarks run
# with the best one for the CPU; an environment may force an older one (these machines set
# OPENBLAS_CORETYPE), which can slow our side by a third.
shape = (2, 32, 33, 33, 32) if FAST else (4, 128, 65, 65, 128)
Nb, Cb, Hb, Wb, Kb = shape
xb = rng.standard_normal((Nb, Cb, Hb, Wb)).astype(np.float32)
wb = (0.05 * rng.standard_normal((Kb, Cb, 3, 3))).astype(np.float32)


def best_of(fn, repeats=3):
    fn()  # warm up (compilation, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def ours(rate):
    x_ = Tensor(xb, requires_grad=True)
    y_ = F.conv2d(x_, Tensor(wb, requires_grad=True), padding=rate, dilation=rate)
    y_.sum().backward()


ratios = {}
try:
    from threadpoolctl import threadpool_info

    blas = [f"{i['internal_api']} {i.get('architecture')}" for i in threadpool_info()
            if i["user_api"] == "blas"]
    print("BLAS kernel in use:", ", ".join(blas) or "unknown")
except ImportError:
    pass
try:
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))

    def theirs(rate):
        x_ = torch.tensor(xb, requires_grad=True)
        y_ = torch.nn.functional.conv2d(x_, torch.tensor(wb, requires_grad=True),
                                        padding=rate, dilation=rate)
        y_.sum().backward()

    for rate in (2, 12):
        t_ours, t_torch = best_of(lambda: ours(rate)), best_of(lambda: theirs(rate))
        ratios[rate] = t_ours / t_torch
        print(f"3×3 rate {rate:2d} on {xb.shape}, forward + backward: ours {t_ours * 1e3:.1f} "
              f"ms, PyTorch {t_torch * 1e3:.1f} ms (ratio ours/PyTorch {ratios[rate]:.2f})")
except ImportError:
    print(f"ours {best_of(lambda: ours(2)) * 1e3:.1f} ms; PyTorch is not installed (pip install "
          "torch) so there is no comparison")

# %% 6. Fewer multiplications: Winograd on one tile (the CPU's cpu_v4, cpu_v5 and cpu_v6)
# Two outputs of a 3-tap correlation, y0 = w0·x0 + w1·x1 + w2·x2 and y1 = w0·x1 + w1·x2 + w2·x3,
# take 6 multiplications.  Winograd's minimal filtering algorithm F(2, 3) takes 4:
#     m1 = (x0 − x2)·w0          m2 = (x1 + x2)·(w0 + w1 + w2)/2
#     m3 = (x2 − x1)·(w0 − w1 + w2)/2          m4 = (x1 − x3)·w2
#     y0 = m1 + m2 + m3,   y1 = m2 − m3 − m4
# (the filter's sums are made once per filter, the input's once per tile and channel).
x4, w3 = rng.standard_normal(4), rng.standard_normal(3)
m1, m2 = (x4[0] - x4[2]) * w3[0], (x4[1] + x4[2]) * (w3[0] + w3[1] + w3[2]) / 2
m3, m4 = (x4[2] - x4[1]) * (w3[0] - w3[1] + w3[2]) / 2, (x4[1] - x4[3]) * w3[2]
y_winograd_1d = np.array([m1 + m2 + m3, m2 - m3 - m4])
y_direct_1d = np.array([w3 @ x4[0:3], w3 @ x4[1:4]])
print("F(2, 3): 4 multiplications instead of 6, difference "
      f"{np.abs(y_winograd_1d - y_direct_1d).max():.1e}")
# In matrices, y = Aᵀ [(G w) ⊙ (Bᵀ x)]; nested in both directions a 4×4 input tile gives a 2×2
# block of outputs with 16 multiplications instead of 36 (2.25× fewer).  Dilation fits in by
# the "hole algorithm" view: outputs i and i + d read inputs spaced d apart, so the tile is 4×4
# inputs taken with stride d.  One tile of section 1's convolution (rate d), by the library's
# matrices, against the loops:
from tinydeeplab.kernels import atrous_conv_winograd as winograd  # noqa: E402

BT, G, AT = winograd.BT, winograd.G, winograd.AT
i0, j0, k0 = 2, 3, 1  # the outputs (i0, j0), (i0, j0 + d), (i0 + d, j0), (i0 + d, j0 + d)
block = np.zeros((2, 2))
for c in range(C):
    tile = np.pad(x[0, c], pad)[i0:i0 + 4 * d:d, j0:j0 + 4 * d:d]  # 4×4 inputs, spaced d
    block += AT @ ((G @ w[k0, c] @ G.T) * (BT @ tile @ BT.T)) @ AT.T
block += b[k0]
tile_gap = float(np.abs(block - y_loops[0, k0, i0:i0 + 2 * d:d, j0:j0 + 2 * d:d]).max())
print(f"one 2×2 block by Winograd against the loops: {tile_gap:.1e}")
# cpu_v4 does this for every tile at once: 16 GEMMs over the channels (U[e] = G w Gᵀ at
# position e, (K × C), times V[e] = Bᵀ X B, (C × tiles)), forward, dx and dw (the transposed
# transforms).  It takes this path for large layers only — below ~1.5 GFLOP the transforms cost
# more than the multiplications saved (kernels/atrous_conv.py, winograd_pays).  cpu_v5 does
# the same additions with the channels last — every number of a tile above is then a run of C
# numbers side by side, which the CPU adds 16 at a time — and so pays from ~0.4 GFLOP on.
# cpu_v6, the default, takes F(4×4, 3×3) on layers with many tiles: a 6×6 tile of inputs
# (spaced d) gives a 4×4 block of outputs with 36 products instead of 144.  The same block
# formula with the larger matrices (kernels/atrous_conv_winograd4.py), on one tile:
from tinydeeplab.kernels import atrous_conv_winograd4 as winograd4  # noqa: E402

i0, j0 = 2, 3  # outputs (i0 + d·u, j0 + d·v), u, v = 0..3
block4 = np.full((4, 4), b[k0])
for c in range(C):
    tile = np.pad(x[0, c], pad)[i0:i0 + 6 * d:d, j0:j0 + 6 * d:d]  # 6×6 inputs, spaced d
    block4 += winograd4.AT4 @ ((winograd4.G4 @ w[k0, c] @ winograd4.G4.T)
                               * (winograd4.BT4 @ tile @ winograd4.BT4.T)) @ winograd4.AT4.T
tile4_gap = float(np.abs(block4 - y_loops[0, k0, i0:i0 + 4 * d:d, j0:j0 + 4 * d:d]).max())
print(f"one 4×4 block by F(4×4, 3×3) against the loops: {tile4_gap:.1e}")
# The price is in the matrices: Bᵀ holds 4 and 5, Aᵀ 8, G sixths and 24ths, and float32 rounds
# every number they touch.  A 64-channel layer in float32, each F through the library's
# channels-last driver, against float64 (three random layers):
from tinydeeplab.kernels.atrous_conv import COLS_BUDGET_BYTES  # noqa: E402

errors = {2: [], 4: []}
for seed in range(3):
    r = np.random.default_rng(seed)
    x64, w64 = r.standard_normal((1, 64, 29, 29)), r.standard_normal((64, 64, 3, 3)) / 24
    y64 = atrous_conv.conv2d_forward(x64, w64, None, 1, 2, 2, variant="cpu_v3")
    for m in errors:
        y32 = winograd.forward_cl(x64.astype(np.float32), w64.astype(np.float32), None, (2, 2),
                                  (2, 2), COLS_BUDGET_BYTES["cpu"], m=m)
        errors[m].append(float(np.abs(y32 - y64).max() / np.abs(y64).max()))
for m, e in errors.items():
    print(f"F({m}×{m}, 3×3) in float32: largest error {', '.join(f'{v:.1e}' for v in e)} of "
          "the largest output")
print(f"F(4×4)'s error / F(2×2)'s: {np.mean(errors[4]) / np.mean(errors[2]):.0f}× on average")

# %% 7. Outputs in registers: the direct rung (the CPU's cpu_v7, the default)
# A GEMM kernel is fast because it holds a block of outputs in the CPU's registers while the
# inputs stream past, so each number loaded feeds many multiply-adds.  im2col pays for that
# with a copy: every output pixel's receptive field, C·kh·kw numbers, is written out first.
# On a layer with few input channels — a 7×7 stem reads 3 channels — the copy is most of the
# work.  kernels/atrous_conv_direct.py does the GEMM's trick without the copy: R = 7
# neighbouring outputs of a row × one vector of output channels (16 or 8 lanes) are the
# accumulators; for each tap (c, p, q) it loads one vector of weights and, for each of the 7
# outputs, one pixel of the padded image spread over all lanes, and adds their products —
# the same formula as section 1, summed tap by tap in im2col's row order.  Its "plain" block
# is those loops in ordinary Python (the compiler keeps the sums in memory); its "simd" block
# is the same loops in LLVM's vector instructions, sums in registers.  A stem in float32:
from tinydeeplab.kernels import atrous_conv_direct as direct  # noqa: E402

xs = rng.standard_normal((2, 3, 65, 65)).astype(np.float32)
ws = (0.1 * rng.standard_normal((16, 3, 7, 7))).astype(np.float32)
ys64 = atrous_conv.conv2d_forward(xs.astype(np.float64), ws.astype(np.float64), None, 2, 3, 1,
                                  variant="cpu_v3")
stem = {}
for label, run in (
        ("direct, plain block", lambda: direct.forward(xs, ws, None, (2, 2), (3, 3), (1, 1),
                                                       block="plain")),
        ("direct, simd block", lambda: direct.forward(xs, ws, None, (2, 2), (3, 3), (1, 1))),
        ("im2col + GEMM (cpu_v6)", lambda: atrous_conv.conv2d_forward(
            xs, ws, None, 2, 3, 1, variant="cpu_v6"))):
    stem[label] = float(np.abs(run() - ys64).max() / np.abs(ys64).max())
    print(f"{label:24s} {best_of(run) * 1e3:6.2f} ms, error {stem[label]:.1e} of the largest "
          "output")
# cpu_v7 takes this rung where C·kh·kw ≤ 576 (the stems and the 16-64-channel layers) and
# Winograd does not pay; above, im2col's copy is small next to the arithmetic and the GEMM's
# own blocking wins.  The stems' weight gradient uses the same block, with a kernel row's 7
# taps as its outputs and an image row's pixels as its taps.

# %% Check
assert np.abs(y_gemm - y_loops).max() < 1e-10, "im2col + GEMM disagrees with the loops"
assert np.abs(y_winograd_1d - y_direct_1d).max() < 1e-12 and tile_gap < 1e-10
assert tile4_gap < 1e-10 and max(errors[2]) < max(errors[4]) < 1e-4
assert max(stem.values()) < 1e-5, "a float32 stem disagrees with the float64 one"
assert np.abs(cols - cols_lib).max() == 0
assert np.abs(y_cuda - y_cpu).max() < 1e-4, "the CUDA kernel disagrees with the CPU one"
assert max(np.abs(dx - dx_lib).max(), np.abs(dw - dw_lib).max(), np.abs(db - db_lib).max()) \
    < 1e-10
assert abs(adjoint) < 1e-9 and grad_ok
print("Check passed.")

# %% Exercise — the weight gradient without im2col (a solution: lessons/solutions/02_writing_the_kernel.py)
# dw[k,c,p,q] = Σ_{n,i,j} dy[n,k,i,j] · x[n, c, i·s − pad + p·d, j·s − pad + q·d]: write it with
# one loop over the taps (p, q) and array operations inside (pad x first, then slice it as
# im2col does).  The check compares with atrous_conv.conv2d_backward, strided and dilated.
def weight_gradient(x, dy, kh, kw, s, pad, d):
    raise NotImplementedError("your code here")


exercises.run(exercises.check_weight_gradient, weight_gradient)

# %% Summary — read next
# * im2col with holes turns the dilated convolution into one matrix product; its backward is
#   two more products and col2im, the transpose of im2col (checked by the adjoint identity).
# * The CPU loops and the CUDA kernel share one line of index math; gradcheck checks every
#   gradient element by finite differences.
# * Speed depends on the shape and on the BLAS kernel: benchmarks/ measure it side by side.
# * Two ways past im2col + GEMM: Winograd cuts the multiplications; the direct rung, its
#   sums in registers, cuts im2col's copy where there are few input channels.
# Next: lesson 14 for the GPU kernel (kernels track), 04 for the network built from these
# convolutions, or 07 for the CRF's kernel.
