"""Lesson 1 — Atrous convolution: bigger fields of view without losing resolution.

You will learn:
  * what a dilated ("atrous", with holes) convolution computes, and its output-size rule;
  * why a 3×3 kernel with padding = dilation and stride 1 keeps the size of its input;
  * how the field of view grows with the dilation rate at the same parameter count;
  * why DeepLab convolves the full-resolution map with holes instead of downsampling,
    convolving and upsampling (DeepLab v2 §3.1, Fig. 2-3).

Run:  python lessons/01_atrous_convolution.py   (TDL_FAST=1 for a smaller, quicker run)
Figures go to $TDL_OUT, else ./lesson_out/ in the working directory.
"""
# %% Setup
import os

import tinydeeplab  # noqa: F401  first: its thread set-up must precede NumPy's (README)
import numpy as np

import tinydeeplab.functional as F
from tinydeeplab import Tensor, exercises, lessons
from tinydeeplab.kernels import atrous_conv

FAST = lessons.fast()  # TDL_FAST=1: a smaller run (the test suite's smoke test)
OUT = lessons.output_dir()  # figures and runs: $TDL_OUT, else ./lesson_out
rng = np.random.default_rng(0)

# %% 1. The definition, as loops
# y[i, j] = Σ_{p,q} w[p, q] · x[i·s − pad + p·d, j·s − pad + q·d]: the kernel taps sit d pixels
# apart, so a 3×3 kernel at d = 2 reads a 5×5 neighbourhood with 9 weights.  Here is that
# sum written out for one channel, next to the library's kernel.


def atrous_1ch(x, w, d, pad):
    H, W = x.shape
    k = w.shape[0]
    Ho, Wo = H + 2 * pad - d * (k - 1), W + 2 * pad - d * (k - 1)
    xp = np.pad(x, pad)
    y = np.zeros((Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            y[i, j] = sum(w[p, q] * xp[i + p * d, j + q * d] for p in range(k) for q in range(k))
    return y


X = rng.standard_normal((11, 13))
w = rng.standard_normal((3, 3))
y_loops = atrous_1ch(X, w, d=2, pad=2)
y_lib = atrous_conv.conv2d_forward(X[None, None], w[None, None], None, 1, 2, 2)[0, 0]
print("loops vs library, max |difference|:", np.abs(y_loops - y_lib).max())

# %% 2. The output size
# The last tap of a dilated kernel sits d·(k − 1) pixels after the first, so
#     H_out = ⌊(H + 2·pad − d·(k − 1) − 1) / s⌋ + 1.
# With k = 3, s = 1 and pad = d this is H + 2d − 2d = H: the size is kept at any rate.
N, C, H, W, K = (5, 8, 56, 128, 33) if not FAST else (1, 2, 12, 20, 3)
x = Tensor(rng.standard_normal((N, C, H, W)).astype(np.float32))
w = Tensor(rng.standard_normal((K, C, 3, 3)).astype(np.float32))
shapes = {d: F.conv2d(x, w, padding=d, dilation=d).shape for d in (4, 24)}
for d, shape in shapes.items():
    print(f"input {x.shape}, {K} filters 3×3, dilation {d:2d}, padding {d:2d} -> {shape}")

# %% 3. The field of view
# Stacking L layers of 3×3 convolutions at rates d_1..d_L sees 1 + 2·Σ d_l pixels across.
# The same 9 weights per layer cover far more at higher rates: we measure it by pushing a
# single bright pixel through the stack and looking at where it arrives.  The *extent* grows
# with the rates; the *number* of pixels reached can lag behind — with rates (2, 4, 8) only
# every other pixel is ever read.  The DeepLab v2 paper does not discuss this; the name
# "gridding" and the remedy of choosing rates without a common factor (such as 1, 2, 5) come
# from later work (Wang et al. 2018, "Understanding Convolution for Semantic Segmentation",
# hybrid dilated convolution).  In DeepLab's ResNet the dilated 3×3 convolutions sit between
# undilated 1×1s and after a stage's first block, which keeps the previous rate (lesson 04).


def reach(rates, size=101):
    """(extent, pixels reached) along the middle row for an impulse through the stack."""
    impulse = np.zeros((1, 1, size, size), np.float32)
    impulse[0, 0, size // 2, size // 2] = 1
    h = Tensor(impulse)
    ones = Tensor(np.ones((1, 1, 3, 3), np.float32))
    for d in rates:
        h = F.conv2d(h, ones, padding=d, dilation=d)
    hit = np.nonzero(h.numpy()[0, 0, size // 2] > 0)[0]
    return int(hit.max() - hit.min() + 1), len(hit)


for rates in [(1, 1, 1), (1, 2, 4), (2, 4, 8)]:
    extent, reached = reach(rates)
    print(f"rates {rates}: field of view {extent} pixels (formula {1 + 2 * sum(rates)}), "
          f"{reached} of them read; 27 weights either way")

# %% 4. Atrous on the full map versus downsample -> convolve -> upsample
# DeepLab's alternative to holes would be to shrink the feature map by 2, apply an ordinary
# 3×3 kernel (same field of view as rate 2) and upsample the result.  Same parameters — but the
# responses are computed at only 1/4 of the positions, and the upsampled map is blurred.
size = 96 if not FAST else 48
yy, xx = np.mgrid[0:size, 0:size]
image = ((np.hypot(yy - size / 2, xx - size / 2) < size / 3) ^ (xx % 16 < 8)).astype(np.float32)
edge = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float32)[None, None]  # Sobel: rows
img = Tensor(image[None, None])
dense = F.conv2d(img, Tensor(edge), padding=2, dilation=2).numpy()[0, 0]
small = F.interpolate(img, (size // 2, size // 2))
sparse = F.interpolate(F.conv2d(small, Tensor(edge), padding=1), (size, size)).numpy()[0, 0]
print(f"responses computed: atrous {dense.size}, downsample path {(size // 2) ** 2}")

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(1, 3, figsize=(10, 3.4))
for a, (title, im) in zip(ax, [("input", image), ("atrous 3×3, rate 2 (full resolution)", dense),
                               ("downsample ×2, 3×3, upsample ×2", sparse)]):
    a.imshow(im, cmap="gray")
    a.set_title(title, fontsize=9)
    a.axis("off")
fig.savefig(os.path.join(OUT, "01_atrous_vs_downsampling.png"), dpi=90, bbox_inches="tight")
plt.close(fig)
print("figure:", os.path.join(OUT, "01_atrous_vs_downsampling.png"))

# %% Check
assert np.allclose(y_loops, y_lib, atol=1e-10), "the loops and the kernel disagree"
assert all(shape == (N, K, H, W) for shape in shapes.values()), shapes
assert all(reach(r)[0] == 1 + 2 * sum(r) for r in [(1, 1, 1), (1, 2, 4), (2, 4, 8)])
assert reach((2, 4, 8))[1] < reach((2, 4, 8))[0]  # gridding: holes never filled
# the atrous map keeps sharper edges: more of its energy in fine detail than the blurred path
detail = lambda m: np.abs(np.diff(m, axis=1)).mean()  # noqa: E731
assert detail(dense) > detail(sparse)
print("Check passed.")

# %% Exercise — the output size (a solution: lessons/solutions/01_atrous_convolution.py)
# Write the output size of a dilated convolution (one side): input H, kernel k, stride s,
# padding pad, dilation d.  The check compares it with the kernel's on 40 random layers.
def output_size(H, k, s, pad, d):
    raise NotImplementedError("your code here")


exercises.run(exercises.check_output_size, output_size)

# %% Summary — read next
# * y = Σ w · x[i·s − pad + p·d]: a dilated 3×3 reads pixels d apart; with pad = d and s = 1 it
#   keeps the map's size, and its field of view grows as 1 + 2·Σd at the same 9 weights.
# * Convolving the full-resolution map with holes computes every response; downsampling,
#   convolving and upsampling computes a quarter of them and blurs the rest.
# Next: lesson 04 (how DeepLab's ResNet uses this to keep a 1/8 map) — the network track
# 01 → 04 → 05 → 06 → 09.  For the kernel itself: 03 → 02.
