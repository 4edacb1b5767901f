"""Lesson 12 — Multi-scale inputs and upsampling: where a logit sits, and what scales buy.

You will learn:
  * where logit i of an output-stride-8 network sits on the input — measured with gradients —
    and why DeepLab's crops are 8k + 1 pixels (321, 513);
  * how far the library's label downsampling and bilinear upsampling (align_corners=False,
    PyTorch's convention) are from that grid, in pixels;
  * bilinear ×8 upsampling of the logits against nearest, and multi-scale inputs (scales 1,
    0.75, 0.5 fused by max) and flipping at test time, measured on a small trained network;
  * MSC in training: the loss on each scale and on their fusion (DeepLab v2 §3.2).

Run:  python lessons/12_multiscale_and_upsampling.py   (TDL_FAST=1 for a smaller run)
"""
# %% Setup
import os
import shutil

import tinydeeplab  # noqa: F401  first: its thread set-up must precede NumPy's (README)
import numpy as np

import tinydeeplab.functional as F
from tinydeeplab import Tensor, data, exercises, lessons, models, no_grad
from tinydeeplab.evaluate import evaluate
from tinydeeplab.metrics import ConfusionMatrix
from tinydeeplab.train import TrainConfig, downsample_labels, segmentation_loss, train

FAST = lessons.fast()  # TDL_FAST=1: a smaller run (the test suite's smoke test)
OUT = lessons.output_dir()  # figures and runs: $TDL_OUT, else ./lesson_out
rng = np.random.default_rng(0)

# %% 1. Where does logit i sit on the input?
# Every strided layer of the backbone (the 7×7 stem, the max pool, the first block of stage 2)
# has padding k // 2, so output pixel o of each is centred on input pixel 2·o; three of them
# put feature (and logit) i on input pixel 8·i.  Measured on the backbone's features (the
# heads are centred 3×3 convolutions): the input columns that move feature column i are the
# gradient's support; its centre is where the feature sits.  The input is wide enough that no
# support reaches a border (the tiny backbone reads ±73 pixels, printed below).
WIDE = 8 * 60 + 1
backbone = models.deeplab_v2(5, "tiny", 8, seed=0).eval().backbone
x = Tensor(rng.standard_normal((1, 3, 33, WIDE)).astype(np.float32), requires_grad=True)
centres = {}
for i in (20, 25, 30, 35, 40):
    x.grad = None
    backbone(x)[:, :, 2, i].sum().backward()
    cols = np.nonzero(np.abs(x.grad[0]).sum(axis=(0, 1)) > 0)[0]
    centres[i] = (cols.min() + cols.max()) / 2
    print(f"feature column {i:2d}: reads input columns {cols.min()}..{cols.max()}, centre "
          f"{centres[i]:.1f} (8·i = {8 * i})")
SIZE = 161  # 8·20 + 1
h = models.deeplab_v2(5, "tiny", 8, seed=0).eval()(Tensor(np.zeros((1, 3, SIZE, SIZE),
                                                                    np.float32))).shape[2]
print(f"a {SIZE}×{SIZE} input gives {h}×{h} logits: logit 0 on pixel 0, logit {h - 1} on "
      f"pixel {8 * (h - 1)} = {SIZE} − 1, the last — an 8k+1 crop puts both ends on the grid")

# %% 2. How far are the labels and the upsampled logits from that grid?
# In training, downsample_labels gives logit i the label of pixel (i + 0.5)·H/h (the centre of
# the i-th of h equal bins); F.interpolate with align_corners=False (PyTorch's default, ours)
# puts logit i on the same place when it upsamples.  DeepLab's Caffe code used
# align_corners=True geometry: logit i on pixel i·(H−1)/(h−1) = 8·i for 8k+1 sizes.
rows = np.minimum(((np.arange(h) + 0.5) * SIZE / h).astype(int), SIZE - 1)
offset = rows - 8 * np.arange(h)
print(f"label pixel sampled for logit i minus 8·i: from {offset.min():+d} to {offset.max():+d} "
      f"pixels (i = 0 … {h - 1})")
up_false = (np.arange(h) + 0.5) * SIZE / h - 0.5  # where align_corners=False places logit i
up_true = np.arange(h) * (SIZE - 1) / (h - 1)  # where align_corners=True places it
print(f"upsampling, logit i placed at minus 8·i: align_corners=False "
      f"{(up_false - 8 * np.arange(h)).min():+.2f} … {(up_false - 8 * np.arange(h)).max():+.2f} "
      f"px, align_corners=True {np.abs(up_true - 8 * np.arange(h)).max():.2f} px")
# At most half a stride (4 px): small against objects, but not nothing at their boundaries —
# the measurement in section 3 says how much it matters here.

# %% 3. Upsampling and scales at test time, on a small trained network
n_train, n_val = (24, 8) if FAST else (120, 30)
root = lessons.synthetic_set("12", n_train, n_val, size=97, seed=12)
run_dir = os.path.join(OUT, "run_12")
shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time
iterations = 40 if FAST else 800
model, _ = train(TrainConfig(root, run_dir, crop=81, scale=(0.75, 1.25), batch_size=4,
                             iterations=iterations, lr=0.02, checkpoint_every=10**6, seed=0),
                 log=lambda s: None, progress=False)
val = data.VOCSegmentation(root, "val")


def score(upsample):
    """val mIoU with the logits brought to the label size by ``upsample(logits, (H, W))``."""
    m = ConfusionMatrix(val.num_classes)
    model.eval()
    with no_grad():
        for i in range(len(val)):
            image, label = val[i]
            z = model(Tensor(data.to_input(image)[None])).data
            m.update(upsample(z, label.shape)[0].argmax(0), label)
    return m.scores()["miou"]


def nearest(z, size):
    H, W = size
    r = np.minimum((np.arange(H) * z.shape[2] / H).astype(int), z.shape[2] - 1)
    c = np.minimum((np.arange(W) * z.shape[3] / W).astype(int), z.shape[3] - 1)
    return z[:, :, r[:, None], c[None, :]]


results = {
    "nearest ×8": score(nearest),
    "bilinear, align_corners=True": score(
        lambda z, s: F.interpolate(Tensor(z), s, align_corners=True).data),
    "bilinear (the library's)": evaluate(model, val)["plain"]["miou"],
    "bilinear + flip": evaluate(model, val, flip=True)["plain"]["miou"],
    "scales 1, 0.75, 0.5 (max)": evaluate(model, val, scales=(1, 0.75, 0.5))["plain"]["miou"],
    "scales 1, 0.75, 0.5 + flip": evaluate(model, val, scales=(1, 0.75, 0.5),
                                           flip=True)["plain"]["miou"],
}
for name, value in results.items():
    print(f"{name:>28s}: val mIoU {value:.4f}")
# One trained network, 30 validation images (it trained on scales 0.75-1.25 only): gaps of a
# few thousandths are below what this can resolve; read the larger ones only.

# %% 4. MSC in training: a loss per scale and one on the fusion
# models.MSC runs the network on the image at scales 1, 0.75, 0.5; in training it returns the
# three logits and their max-fusion (upsampled to scale 1's logits), and segmentation_loss
# sums the four cross-entropies, each against the labels resized to its own size.
msc = models.MSC(models.deeplab_v2(val.num_classes, "tiny", 8, seed=0)).train()
image, label = val[0]
outputs = msc(Tensor(data.to_input(image)[None]))
terms = [segmentation_loss(o, label[None].astype(np.int64)).item() for o in outputs]
for name, o, t in zip(("scale 1", "scale 0.75", "scale 0.5", "max fusion"), outputs, terms):
    print(f"{name:>10s}: logits {o.shape[2]}×{o.shape[3]}, loss {t:.3f}")
total = segmentation_loss(outputs, label[None].astype(np.int64)).item()
print(f"training loss = their sum: {total:.3f}; the forward costs 1 + 0.56 + 0.25 ≈ 1.8× "
      f"one scale's")

# %% Check
assert all(centres[i] == 8 * i for i in centres), centres
assert 8 * (h - 1) == SIZE - 1
assert offset.min() >= -4 and offset.max() <= 4
assert len(outputs) == 4 and abs(total - sum(terms)) < 1e-4 * max(1.0, total)
assert all(np.isfinite(v) for v in results.values())
assert downsample_labels(np.zeros((1, SIZE, SIZE), np.uint8), (h, h)).shape == (1, h, h)
print("Check passed.")


# %% Exercise — fuse the scales (a solution: lessons/solutions/12_multiscale_and_upsampling.py)
# Given a network, an input x (a Tensor (1, 3, H, W)) and scales (0.75, 0.5), return MSC's
# test-time output: the logits at scale 1, and at each scale (input resized with
# F.interpolate to max(1, int(H·s)) × max(1, int(W·s))), upsampled to scale 1's logits and
# fused by the element-wise maximum (numpy.maximum on the .data arrays is fine).
def msc_fuse(network, x, scales):
    raise NotImplementedError("your code here")


exercises.run(exercises.check_msc_fuse, msc_fuse)

# %% Summary — read next
# * At output stride 8 logit i sits on input pixel 8·i (measured); 8k+1 crops put the first
#   and last logits on the first and last pixels.  align_corners=False geometry, ours and
#   PyTorch's, is at most 4 px off that grid (section 2).
# * At test time, on one small network and 30 images (section 3): nearest, bilinear and
#   align_corners=True upsampling within 0.002 mIoU of each other (0.005 with machine C's
#   own OpenBLAS kernel), flipping −0.004 (+0.003), and scales 1/0.75/0.5 0.021 (0.002)
#   *below* one scale — a network trained on scales 0.75-1.25 only, without MSC; the paper
#   trains with MSC (section 4) and gains from it.
# * MSC trains with four losses — three scales and their max — for ~1.8× the forward cost.
# Next: lesson 13 — pre-training (network track).
