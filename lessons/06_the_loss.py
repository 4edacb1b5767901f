"""Lesson 6 — The loss: cross-entropy at 1/8 resolution against downsampled labels, void ignored.

You will learn:
  * the pixel-wise cross-entropy DeepLab v2 minimises, written out and checked against the
    library (and PyTorch's, with ignore_index=255);
  * why labels are resized by *nearest neighbour* — label ids are names, not quantities, and
    void (255) must stay void;
  * why, in training, DeepLab shrinks the labels to the logits' 1/8 resolution instead of
    blowing the logits up to the labels' size: nearly the same gradient for 64× less work;
  * how the void band around objects leaves the loss alone.

Run:  python lessons/06_the_loss.py   (TDL_FAST=1 for a smaller, quicker run)
"""
# %% Setup
import os
import time

import tinydeeplab  # noqa: F401  first: its thread set-up must precede NumPy's (README)
import numpy as np

import tinydeeplab.functional as F
from tinydeeplab import Tensor, data, exercises, lessons, models
from tinydeeplab.train import downsample_labels

FAST = lessons.fast()  # TDL_FAST=1: a smaller run (the test suite's smoke test)
OUT = lessons.output_dir()  # figures and runs: $TDL_OUT, else ./lesson_out
rng = np.random.default_rng(0)

# %% 1. Cross-entropy, written out
# For logits z (N, C, h, w) and labels y (N, h, w):
#     L = −(1/|V|) Σ_{p ∈ V} log softmax(z_p)[y_p],   V = pixels whose label is not 255.
# Void pixels (object borders, unlabelled regions) contribute neither loss nor gradient.
image, label = data.synthetic_sample(161, np.random.default_rng(3))
N, C = 1, len(data.SYNTHETIC_CLASSES)
h = w = 21  # what a 161×161 crop gives at output stride 8
z = rng.standard_normal((N, C, h, w))
y = downsample_labels(label[None], (h, w)).astype(np.int64)
valid = y != 255
log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
picked = np.take_along_axis(log_softmax, np.where(valid, y, 0)[:, None], axis=1)[:, 0]
L_by_hand = -(picked[valid]).mean()
zt = Tensor(z, requires_grad=True)
L_lib = F.cross_entropy(zt, y)
L_lib.backward()
print(f"cross-entropy by hand {L_by_hand:.6f}, library {L_lib.item():.6f}, "
      f"{valid.sum()} of {valid.size} pixels count")
# the gradient is (softmax − one-hot) / |V| on counted pixels and exactly 0 on void ones
void_grad = float(np.abs(zt.grad[:, :, ~valid[0]]).max()) if (~valid).any() else 0.0
print("largest gradient on a void pixel:", void_grad)
try:
    import torch

    L_torch = torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(y),
                                                ignore_index=255).item()
    print(f"PyTorch cross_entropy(ignore_index=255): {L_torch:.6f}")
except ImportError:
    L_torch = L_lib.item()
    print("PyTorch is not installed: comparison skipped")

# %% 2. Resizing labels: nearest neighbour, never interpolation
# Ids are names.  Where class 1 meets class 3, interpolation gives 2 — a third class that is
# not there — and averaging with void (255) gives ids that are not classes at all.  A strip
# of three pixels of class 1 beside three of class 3, shrunk to three pixels:
strip = np.array([[[[1, 1, 1, 3, 3, 3]]]], np.float32)
shrunk = F.interpolate(Tensor(strip), (1, 3)).numpy()[0, 0, 0]
names = data.SYNTHETIC_CLASSES
print(f"bilinear: {strip[0, 0, 0].astype(int).tolist()} -> {shrunk.tolist()}: the middle pixel "
      f"becomes {int(shrunk[1])} ({names[int(shrunk[1])]!r}), between {names[1]!r} and "
      f"{names[3]!r}; nearest: "
      f"{downsample_labels(strip[0].astype(np.uint8), (1, 3))[0, 0].tolist()}")
nearest = downsample_labels(label[None], (h, w))[0]
Ht = label.shape[0]
bilinear = F.interpolate(Tensor(label[None, None].astype(np.float32)), (h, w)).numpy()[0, 0]
invented = np.setdiff1d(np.unique(np.round(bilinear)), np.unique(label))
print("ids after nearest:", np.unique(nearest).tolist(), "— after bilinear, rounded, ids that "
      f"were not in the label: {invented[:8].tolist()}{' ...' if invented.size > 8 else ''}")

# %% 3. Resize the labels, not the logits
# The alternative — upsample the 21×21 logits ×8 to 161×161 and compare with full labels —
# evaluates the loss on 64× more pixels and backpropagates through the upsampling.  The signal
# is nearly the same — measured below as the cosine between the two gradients on the logits,
# which is what training follows: the labels at 1/8 are what the 1/8 logits can represent.
net = models.deeplab_v2(C, "tiny", 8, seed=0)
x = Tensor(data.to_input(image)[None])
head_logits = net(x).numpy()  # (1, C, 21, 21): the network's part is the same either way
repeats = 5 if FAST else 50


def step(upsample):
    logits = Tensor(head_logits, requires_grad=True)
    if upsample:
        loss = F.cross_entropy(F.interpolate(logits, label.shape), label[None].astype(np.int64))
    else:
        loss = F.cross_entropy(logits, downsample_labels(label[None], logits.shape[2:])
                               .astype(np.int64))
    loss.backward()
    return loss.item(), logits.grad.ravel()


timings = {}
for upsample in (False, True):
    step(upsample)
    t0 = time.perf_counter()
    for _ in range(repeats):
        value = step(upsample)
    timings[upsample] = ((time.perf_counter() - t0) / repeats, value)
(t8, (l8, g8)), (tfull, (lfull, gfull)) = timings[False], timings[True]
print(f"loss + its backward: labels at 1/8 {t8 * 1e3:.2f} ms (loss {l8:.4f}); logits "
      f"upsampled to {Ht}×{Ht} {tfull * 1e3:.2f} ms (loss {lfull:.4f}), {tfull / t8:.0f}× "
      "the time")
# what training uses is the gradient on the network's logits: the same direction either way?
cosine = float(g8 @ gfull / (np.linalg.norm(g8) * np.linalg.norm(gfull)))
print(f"cosine between the two gradients on the 21×21 logits: {cosine:.3f}")

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(1, 4, figsize=(13, 3.3))
cmap = data.voc_colormap()
ax[0].imshow(image)
ax[0].set_title("image 161×161", fontsize=9)
ax[1].imshow(cmap[label])
ax[1].set_title("label (white band: void 255)", fontsize=9)
ax[2].imshow(cmap[nearest])
ax[2].set_title(f"nearest to {h}×{w}: what the loss sees", fontsize=9)
ax[3].imshow(bilinear, cmap="nipy_spectral")
ax[3].set_title("bilinear on ids: invented classes", fontsize=9)
for a in ax:
    a.axis("off")
fig.savefig(os.path.join(OUT, "06_the_loss.png"), dpi=90, bbox_inches="tight")
plt.close(fig)

# %% Check
assert abs(L_by_hand - L_lib.item()) < 1e-10 and abs(L_torch - L_lib.item()) < 1e-10
assert void_grad == 0.0 and (~valid).any(), "void pixels must get no gradient"
assert set(np.unique(nearest)) <= set(np.unique(label)), "nearest keeps ids"
assert invented.size > 0, "interpolating ids invents classes"
assert int(shrunk[1]) == 2, "interpolating ids 1 and 3 invents id 2"
assert set(downsample_labels(strip[0].astype(np.uint8), (1, 3))[0, 0]) <= {1, 3}
assert cosine > 0.9, "the two losses push the logits the same way"
print("Check passed.")

# %% Exercise — nearest-neighbour label resizing (a solution: lessons/solutions/06_the_loss.py)
# Resize labels (B, H, W) to (h, w) by nearest neighbour, sampling the input at the centre of
# each output pixel.  The check compares with the library's train.downsample_labels.
def resize_labels(labels, size):
    raise NotImplementedError("your code here")


exercises.run(exercises.check_resize_labels, resize_labels)

# %% Summary — read next
# * The loss is the cross-entropy over non-void pixels at the logits' 1/8 resolution.
# * Labels are resized by nearest neighbour (ids are names); the labels, not the logits, are
#   resized: the gradient on the logits points the same way (cosine printed above) for far
#   less work.
# Next: lesson 11 — batch norm, and why DeepLab freezes it (network track).
