"""Lesson 10 — Limits: thin structures the network misses, the CRF cannot bring back.

You will learn:
  * why a network that predicts at 1/8 resolution loses structures a few pixels wide (bicycle
    spokes, chair legs): after downsampling they are a fraction of one output cell;
  * that the dense CRF only *redistributes* what the unary already believes — it sharpens
    boundaries the unary roughly has, but a structure the unary misses everywhere gets too
    little support: its look-alike neighbours are as unsure, and a confident look-alike
    further away (the frame) is outvoted — the messages are measured;
  * where the line is: the same thin bars survive the CRF once the unary gives them a little
    more than the background.

Run:  python lessons/10_limits_thin_structures.py   (TDL_FAST=1 changes nothing: it is quick)
"""
# %% Setup
import os

import tinydeeplab  # noqa: F401  first: its thread set-up must precede NumPy's (README)
import numpy as np

import tinydeeplab.functional as F
from tinydeeplab import Tensor, crf, exercises, lessons

OUT = lessons.output_dir()  # figures and runs: $TDL_OUT, else ./lesson_out
rng = np.random.default_rng(0)

# %% 1. A constructed scene: a wheel with thin spokes, a thick frame
# Class 0 background, 1 "bicycle".  The spokes are 2 px wide, the frame bar 16 px.
H = W = 160
yy, xx = np.mgrid[0:H, 0:W]
label = np.zeros((H, W), np.int64)
cy, cx = 80, 70
angle = np.arctan2(yy - cy, xx - cx)
radius = np.hypot(yy - cy, xx - cx)
spokes = (radius < 55) & (np.abs(np.sin(4 * angle)) * radius < 1.2)  # 8 spokes, ~2 px
rim = np.abs(radius - 56) < 2
frame = (np.abs(yy - 40) < 8) & (xx > 60) & (xx < 150)
label[spokes | rim | frame] = 1
thin = spokes | rim
image = np.full((H, W, 3), (90, 140, 90), np.float64)  # grass
image[label == 1] = (200, 40, 40)  # red bicycle
image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)

# %% 2. A "network" that sees the scene at 1/8 resolution
# Stand-in for DeepLab's unary: the fraction of each 8×8 cell covered by the bicycle, turned
# into logits, then upsampled bilinearly — exactly the information a 1/8 output can hold.
# A 2-px spoke covers ≤ 25 % of a cell; the frame fills its cells.


def unary_from_coverage(label, strength, bias):
    cover = label.reshape(H // 8, 8, W // 8, 8).mean(axis=(1, 3))
    logits = np.stack([np.zeros_like(cover), strength * (cover - bias)])[None]
    up = F.interpolate(Tensor(logits.astype(np.float32)), (H, W)).numpy()[0]
    e = np.exp(up - up.max(0))
    return (e / e.sum(0)).astype(np.float32)


def recall(pred, mask):
    return float((pred[mask] == 1).mean())


cases = {}
for name, bias in (("unary misses the spokes", 0.5), ("unary half-sees them", 0.12)):
    probs = unary_from_coverage(label, strength=12.0, bias=bias)
    refined = crf.dense_crf(image, probs)  # DeepLab's parameters, 10 iterations
    before, after = probs.argmax(0), refined.argmax(0)
    cases[name] = dict(probs=probs, before=before, after=after)
    print(f"{name}: spoke/rim recall {recall(before, thin):.2f} -> {recall(after, thin):.2f} "
          f"with CRF; frame recall {recall(before, frame):.2f} -> {recall(after, frame):.2f}; "
          f"pixel accuracy {(before == label).mean():.3f} -> {(after == label).mean():.3f}")

# %% 3. Why: the CRF's message to a spoke pixel
# Mean field adds  w · Σ_j k̃(f_i, f_j) Q_j(l)  to each label's score.  For a spoke pixel the
# bilateral kernel (widths 67 px, 3 colour levels) gathers from red pixels across the whole
# picture: the other spoke pixels, whose Q(bicycle) is as low as its own, and the frame, which
# the unary does label bicycle.  So something outside the unary does say "bicycle" — but how
# loud, against the unary's own verdict?  The score gap bicycle − background, in nats, at the
# first iteration (Q = the unary's softmax), each averaged over the spoke pixels:
probs = cases["unary misses the spokes"]["probs"]
positions = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32)
colours = image.reshape(-1, 3).astype(np.float32)
bilateral = np.concatenate([positions / 67, colours / 3], 1)  # dense_crf's defaults
spatial = positions / 1
spoke_idx = np.flatnonzero(spokes.ravel())
# exact rows of the bilateral kernel for the spoke pixels: the frame's share of their weight
rows = np.exp(-0.5 * ((bilateral[spoke_idx, None, :] - bilateral[None, :, :]) ** 2).sum(-1))
frame_share = float((rows[:, frame.ravel()].sum(1) / rows.sum(1)).mean())
gap = (probs[1] - probs[0]).reshape(-1, 1)  # Q(bicycle) − Q(background), per pixel
messages = {}
for name, features, weight in (("spatial", spatial, 3.0), ("bilateral", bilateral, 4.0)):
    lattice = crf.PermutohedralLattice(features)  # pos_w 3, bi_w 4: dense_crf's defaults
    n = 1 / np.sqrt(lattice.filter(np.ones(H * W, np.float32)))[:, None]  # symmetric norm
    message = weight * (n * lattice.filter(n * gap))[:, 0]  # w · k̃ (Q1 − Q0)
    messages[name] = float(message[spoke_idx].mean())
message_gap = sum(messages.values())
unary_gap = float(np.log(probs[1] / probs[0]).ravel()[spoke_idx].mean())
print(f"mean unary P(bicycle) on spokes {probs[1][spokes].mean():.2f}, on the frame "
      f"{probs[1][frame].mean():.2f}")
print(f"the frame carries {100 * frame_share:.0f} % of a spoke pixel's bilateral weight; "
      f"score gap bicycle − background at a spoke pixel: unary {unary_gap:+.2f} nats, "
      f"bilateral message {messages['bilateral']:+.2f}, spatial message "
      f"{messages['spatial']:+.2f}")
# The frame's voice is outweighed within the bilateral sum itself by the rest of the red
# pixels (the spokes and the rim, whose Q says "background"), and the spatial kernel — 1 px wide — hears only the grass
# beside the spoke: both messages push the same way as the unary.  The CRF refines the
# unary's boundaries; it cannot add what the unary, and so Q, denies nearly everywhere.

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(2, 4, figsize=(13, 6.6))
for row, (name, c) in enumerate(cases.items()):
    panels = [("image" if row == 0 else "ground truth", image if row == 0 else label),
              (f"unary P(bicycle): {name}", c["probs"][1]),
              ("unary argmax", c["before"]), ("after the CRF", c["after"])]
    for a, (title, im) in zip(ax[row], panels):
        a.imshow(im, cmap=None if im.ndim == 3 else "magma")
        a.set_title(title, fontsize=9)
        a.axis("off")
fig.savefig(os.path.join(OUT, "10_thin_structures.png"), dpi=90, bbox_inches="tight")
plt.close(fig)

# %% Check
missed, seen = cases["unary misses the spokes"], cases["unary half-sees them"]
assert recall(missed["before"], thin) < 0.2 and recall(missed["after"], thin) < 0.2, \
    "a structure the unary misses stays missed"
assert recall(missed["after"], frame) > 0.9, "the thick frame survives"
assert recall(seen["after"], thin) > recall(missed["after"], thin) + 0.3, \
    "with some unary support, the CRF keeps thin structures"
assert unary_gap < 0 and message_gap < 0, "no message outvotes the unary on the spokes"
assert frame_share > 0.1, "the frame is a sizeable voice in the spokes' bilateral sum"
print("Check passed.")

# %% Exercise — the appearance kernel (a solution: lessons/solutions/10_limits_thin_structures.py)
# The bilateral kernel's weight between two pixels at positions p_i, p_j (x, y) with colours
# I_i, I_j (r, g, b): exp(−|p_i − p_j|² / 2·sxy² − |I_i − I_j|² / 2·srgb²).  Section 3's
# frame share is built from these weights.
def bilateral_weight(p_i, p_j, I_i, I_j, sxy, srgb):
    raise NotImplementedError("your code here")


exercises.run(exercises.check_bilateral_weight, bilateral_weight)

# %% Summary — read next
# * A 1/8-resolution unary loses structures a few pixels wide; the CRF redistributes what the
#   unary believes — its messages on the spokes push the way the unary already does.
# * With a little unary support the CRF recovers them: it refines, it does not invent.
# Next: lesson 15 for the CRF on the GPU (CRF track), or back to lesson 05 or 09 to see what a
# better unary needs (network track).
