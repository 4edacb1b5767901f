"""Lesson 11 — Batch norm: what it computes, its backward, and why DeepLab freezes it.

You will learn:
  * batch normalisation's forward — each channel standardised with the batch's mean and
    variance, then scaled and shifted — written in NumPy and checked against the library;
  * its backward, derived once and checked against autograd and finite differences;
  * training statistics against the running ones, and how noisy a small batch's are;
  * the same training with batch 2, batch norm learning against frozen, over seeds — DeepLab
    v2 (§4) fine-tunes ResNet-101 with its batch norm frozen at the ImageNet statistics.

Run:  python lessons/11_batch_norm.py   (TDL_FAST=1 for a smaller, quicker run)
"""
# %% Setup
import json
import os

import tinydeeplab  # noqa: F401  first: its thread set-up must precede NumPy's (README)
import numpy as np

from tinydeeplab import Tensor, data, exercises, gradcheck, lessons
from tinydeeplab import functional as F
from tinydeeplab.evaluate import evaluate

FAST = lessons.fast()  # TDL_FAST=1: a smaller run (the test suite's smoke test)
OUT = lessons.output_dir()  # figures and runs: $TDL_OUT, else ./lesson_out
rng = np.random.default_rng(0)

# %% 1. The forward, in NumPy
# For x of shape (N, C, H, W), channel c is standardised over the N·H·W values it has in the
# batch, then scaled by γ_c and shifted by β_c:
#     μ_c = mean(x[:, c]),   σ²_c = mean((x[:, c] − μ_c)²)        (the biased variance)
#     x̂ = (x − μ) / √(σ² + ε),   y = γ x̂ + β
x = rng.standard_normal((3, 4, 5, 7)) * 2.0 + 1.5
gamma, beta, eps = rng.uniform(0.5, 2, 4), rng.standard_normal(4), 1e-5
mu = x.mean(axis=(0, 2, 3), keepdims=True)
var = x.var(axis=(0, 2, 3), keepdims=True)
xhat = (x - mu) / np.sqrt(var + eps)
y_numpy = gamma[None, :, None, None] * xhat + beta[None, :, None, None]
running_mean, running_var = np.zeros(4), np.ones(4)
y_lib = F.batch_norm(Tensor(x), running_mean, running_var, Tensor(gamma), Tensor(beta),
                     training=True, momentum=0.1, eps=eps).numpy()
forward_gap = float(np.abs(y_numpy - y_lib).max())
print(f"NumPy forward against F.batch_norm: max |Δ| {forward_gap:.1e}")

# %% 2. The backward, derived once
# With m = N·H·W values per channel and g = ∂L/∂y:
#     ∂L/∂β = Σ g        ∂L/∂γ = Σ g · x̂
#     ∂L/∂x = γ / √(σ² + ε) · (g − mean(g) − x̂ · mean(g · x̂))
# The two subtracted means are the batch's statistics at work: every x moves μ and σ², so each
# input's gradient feels all the others.  (Without them, the "gradient" of a frozen layer.)
g = rng.standard_normal(x.shape)
axes = (0, 2, 3)
dbeta = g.sum(axes)
dgamma = (g * xhat).sum(axes)
dx = gamma[None, :, None, None] / np.sqrt(var + eps) * (
    g - g.mean(axes, keepdims=True) - xhat * (g * xhat).mean(axes, keepdims=True))
xt, gt, bt = Tensor(x, requires_grad=True), Tensor(gamma, requires_grad=True), \
    Tensor(beta, requires_grad=True)
F.batch_norm(xt, np.zeros(4), np.ones(4), gt, bt, training=True, eps=eps).backward(g)
backward_gap = max(float(np.abs(a - b).max()) for a, b in
                   ((dx, xt.grad), (dgamma, gt.grad), (dbeta, bt.grad)))
print(f"derived backward against autograd: max |Δ| {backward_gap:.1e}")
fd_ok = gradcheck(lambda a, w, b: F.batch_norm(a, np.zeros(4), np.ones(4), w, b,
                                               training=True, eps=eps),
                  [Tensor(x[:2, :, :3, :4].copy(), requires_grad=True),
                   Tensor(gamma.copy(), requires_grad=True), Tensor(beta.copy(), requires_grad=True)])
print(f"finite differences (float64, central): {fd_ok}")

# %% 3. Training statistics and running statistics
# In training the layer uses the batch's μ, σ² and updates running averages
# (running ← 0.9 · running + 0.1 · batch, the variance unbiased: ·m/(m−1)); in evaluation it
# uses the running ones.  How far is one batch's mean from the population's?  For DeepLab's
# last stage a 321×321 crop gives a 41×41 map per image: we draw batches of 1, 2 and 8 such
# maps from a population whose channels vary from image to image, as real features do.
images, side = 2000, 41
per_image = rng.normal(0.0, 0.5, images)  # each image shifts the channel's mean
population_mean = per_image.mean()
spread = {}
for batch in (1, 2, 8):
    means = [per_image[rng.choice(images, batch, replace=False)].mean() +
             rng.normal(0, 1.0, (batch, side, side)).mean() for _ in range(400)]
    spread[batch] = float(np.std(np.array(means) - population_mean))
    print(f"batch of {batch}: its mean is off the population's by {spread[batch]:.3f} "
          f"(std over 400 batches)")
# The per-image variation dominates: averaging 41×41 positions does not remove it, only more
# images do (×1/√batch).  With batch 1-2, the statistics a batch-norm layer trains with jump
# from step to step, and the running averages it evaluates with lag behind what it learned.

# %% 4. Fine-tune with batch 2: batch norm learning against frozen
# DeepLab starts from a trained network and continues with small batches.  So here a base
# network is trained first with batches of 8 (its statistics estimated on those), then
# fine-tuned from it with batches of 2, twice from the same start and on the same batches:
# "learning" normalises with each batch of 2 and trains γ, β; "frozen" keeps the base's
# statistics and γ, β fixed, as DeepLab does.  (From scratch, frozen statistics that no
# training has estimated cannot work at all: see `train --freeze-bn`'s message.)
n_train, n_val = (24, 8) if FAST else (120, 30)
root = lessons.synthetic_set("11", n_train, n_val, size=96, seed=11)
base_iterations, iterations = (40, 20) if FAST else (600, 300)
seeds = (0,) if FAST else (0, 1, 2)
val = data.VOCSegmentation(root, "val")
base_dir = os.path.join(OUT, "run_11_base")
base, _ = lessons.train_run(root, "run_11_base", crop=81, scale=(0.75, 1.25), batch_size=8,
                            iterations=base_iterations, lr=0.02, seed=100)
base_miou = evaluate(base, val)["plain"]["miou"]
print(f"base network (batch 8, {base_iterations} iterations): val mIoU {base_miou:.3f}")
results = {}
for seed in seeds:
    for name, frozen in (("learning", False), ("frozen", True)):
        results[name, seed] = lessons.train_and_score(
            root, f"run_11_{name}_seed{seed}", val, crop=81, scale=(0.75, 1.25), batch_size=2,
            iterations=iterations, lr=0.005, seed=seed, freeze_bn=frozen,
            init=os.path.join(base_dir, "checkpoint.npz"))
mious = {name: np.array([results[name, s][0] for s in seeds]) for name in ("learning", "frozen")}
for name, values in mious.items():
    print(f"batch norm {name:>8s}: val mIoU {values.mean():.3f} ± {values.std():.3f} over "
          f"{len(seeds)} seeds ({', '.join(f'{v:.3f}' for v in values)})")
gap = mious["frozen"] - mious["learning"]  # per seed: the same start and batches
verdict = lessons.paired_verdict(gap, "frozen", "learning")
print(f"frozen − learning, per seed: {', '.join(f'{v:+.3f}' for v in gap)}; mean "
      f"{gap.mean():+.3f}: {verdict}")

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
ax[0].bar([str(b) for b in spread], list(spread.values()))
ax[0].set_xlabel("images in the batch")
ax[0].set_ylabel("batch mean − population mean (std)")
ax[0].set_ylim(bottom=0)
for name in ("learning", "frozen"):
    loss = np.mean([[h["loss"] for h in results[name, s][1]] for s in seeds], axis=0)
    k = max(1, len(loss) // 25)
    ax[1].plot(np.convolve(loss, np.ones(k) / k, mode="valid"),
               label=f"{name}: val mIoU {mious[name].mean():.3f} ± {mious[name].std():.3f}")
ax[1].set_xlabel("iteration")
ax[1].set_ylabel(f"training loss (smoothed, mean of {len(seeds)} seeds)")
ax[1].legend()
fig.savefig(os.path.join(OUT, "11_batch_norm.png"), dpi=90, bbox_inches="tight")
plt.close(fig)

# %% Check
assert forward_gap < 1e-10 and backward_gap < 1e-10 and fd_ok
assert spread[1] > 1.8 * spread[8], "a larger batch must give steadier statistics"
base_losses = [json.loads(line)["loss"] for line in open(os.path.join(base_dir, "log.jsonl"))]
assert np.mean(base_losses[-5:]) < np.mean(base_losses[:5]), "the base network did not learn"
for (name, seed), (_, history) in results.items():
    assert np.isfinite([h["loss"] for h in history]).all(), f"{name}, seed {seed} diverged"
print("Check passed.")


# %% Exercise — batch norm's backward (a solution: lessons/solutions/11_batch_norm.py)
# Given x (N, C, H, W), γ (C,), the upstream gradient g and ε, return (dx, dγ, dβ) of
# y = batch_norm(x) in training mode (section 2 has the formulas).
def batch_norm_backward(x, gamma, g, eps):
    raise NotImplementedError("your code here")


exercises.run(exercises.check_batch_norm_backward, batch_norm_backward)

# %% Summary — read next
# * Batch norm standardises each channel with the batch's statistics; its backward carries
#   two batch means, because every input moves them.
# * A batch's statistics are as noisy as the images in it are few: with DeepLab's batches of
#   a few large crops they jump from step to step — one reason DeepLab keeps the ImageNet
#   statistics frozen while fine-tuning.
# * Fine-tuning a trained network with batches of 2 (section 4, 3 seeds): learning batch norm
#   lost ground against the base here (0.243 → 0.230 ± 0.002; with machine C's own OpenBLAS
#   kernel 0.248 → 0.217 ± 0.013), frozen statistics gained (0.255 ± 0.004) or held the
#   base's level (C: 0.246 ± 0.008), and frozen came out ahead on every seed (+0.022 to
#   +0.030; C +0.012 to +0.046), beyond the seeds' spread — the direction of DeepLab's choice,
#   on a toy scale.  With batches of 2 the statistics it learns from are the noise measured
#   in section 3.
# Next: lesson 12 — multi-scale inputs and upsampling (network track).
