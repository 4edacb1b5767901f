"""Lesson 13 — Pre-training: starting from a network trained on another task.

You will learn:
  * what DeepLab starts from — ImageNet classification weights (and, for its best models,
    MS-COCO segmentation): the backbone is pre-trained, the classifier head is new;
  * how to move a backbone's weights (parameters *and* batch-norm statistics) from one
    network into another whose head differs;
  * at lesson scale, what that buys on a small target set: the same training from scratch and
    from a backbone pre-trained on a different task (object versus background on other
    images), over seeds.

Run:  python lessons/13_pretraining.py   (TDL_FAST=1 for a smaller, quicker run)
"""
# %% Setup
import os
import shutil

import tinydeeplab  # noqa: F401  first: its thread set-up must precede NumPy's (README)
import numpy as np
from PIL import Image

from tinydeeplab import data, exercises, lessons, models
from tinydeeplab.train import TrainConfig, train

FAST = lessons.fast()  # TDL_FAST=1: a smaller run (the test suite's smoke test)
OUT = lessons.output_dir()  # figures and runs: $TDL_OUT, else ./lesson_out

# %% 1. A source task: object versus background, on other images
# The synthetic generator's four textured shape classes, merged into one "object" class, on
# images drawn from another seed: a related task (find the shapes) but not the target one
# (tell them apart) — as ImageNet classification is related to, not the same as, VOC
# segmentation.  Masks keep void (255) as it is.
n_source = 24 if FAST else 200
source = os.path.join(OUT, f"data_13_source_{n_source}_96px_seed21")
if not os.path.exists(os.path.join(source, "classes.txt")):  # (written last: complete)
    shutil.rmtree(source, ignore_errors=True)
    data.make_synthetic_voc(source, n_train=n_source, n_val=1, size=96, seed=21)
    os.remove(os.path.join(source, "classes.txt"))
    folder = os.path.join(source, "SegmentationClass")
    for name in os.listdir(folder):
        with Image.open(os.path.join(folder, name)) as im:
            mask = np.array(im)
        data.write_mask(os.path.join(folder, name), np.where(mask == 255, 255, mask > 0))
    with open(os.path.join(source, "classes.txt"), "w") as f:
        f.write("background\nobject\n")
pre_dir = os.path.join(OUT, "run_13_source")
shutil.rmtree(pre_dir, ignore_errors=True)  # a fresh run each time
source_iterations = 40 if FAST else 800
pre, _ = train(TrainConfig(source, pre_dir, crop=81, scale=(0.75, 1.25), batch_size=8,
                           iterations=source_iterations, lr=0.02, checkpoint_every=10**6,
                           seed=100), log=lambda s: None, progress=False)
print(f"source network (object vs background, {n_source} images, {source_iterations} "
      f"iterations): its head predicts {pre.head.branches[0].weight.shape[0]} classes")

# %% 2. Moving the backbone
# The target network has 5 classes, so its head cannot take the source's; its backbone can.
# A backbone is more than its parameters: every batch norm carries running statistics
# (buffers), which a frozen or evaluated network uses.  backbone.state_dict() has both, in
# torchvision's names, which is what `train --pretrained` reads.
weights = os.path.join(OUT, "run_13_source_backbone.npz")
np.savez(weights, **pre.backbone.state_dict())
state = pre.backbone.state_dict()
params = dict(pre.backbone.named_parameters())
print(f"the backbone's state: {len(state)} arrays — {len(params)} parameters and "
      f"{len(state) - len(params)} batch-norm buffers")

# %% 3. The target task with few images: from scratch against pre-trained, over seeds
n_train, n_val = (8, 8) if FAST else (24, 30)
root = lessons.synthetic_set("13", n_train, n_val, size=96, seed=22)
val = data.VOCSegmentation(root, "val")
iterations = 30 if FAST else 400
seeds = (0,) if FAST else (0, 1, 2)
results = {}
for seed in seeds:
    for name, pretrained in (("scratch", None), ("pre-trained", weights)):
        results[name, seed] = lessons.train_and_score(
            root, f"run_13_{name}_seed{seed}", val, crop=81, scale=(0.75, 1.25), batch_size=4,
            iterations=iterations, lr=0.02, seed=seed, pretrained=pretrained)
mious = {name: np.array([results[name, s][0] for s in seeds])
         for name in ("scratch", "pre-trained")}
for name, values in mious.items():
    print(f"{name:>11s}: val mIoU {values.mean():.3f} ± {values.std():.3f} over {len(seeds)} "
          f"seeds ({', '.join(f'{v:.3f}' for v in values)})")
gap = mious["pre-trained"] - mious["scratch"]  # per seed: the same head and batches
print(f"pre-trained − scratch, per seed: {', '.join(f'{v:+.3f}' for v in gap)}; mean "
      f"{gap.mean():+.3f}: {lessons.paired_verdict(gap, 'pre-trained', 'scratch')}")
# The paper (DeepLab v2, Table 4, ResNet-101 on VOC 2012 val, before the CRF): ImageNet-
# initialised with multi-scale inputs 71.27 %, and with MS-COCO pre-training added 73.28 %
# (+2.01 points; the augmented 10,582-image training set adds another 1.59, to 74.87 %).

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 3.5))
for name in ("scratch", "pre-trained"):
    loss = np.mean([[h["loss"] for h in results[name, s][1]] for s in seeds], axis=0)
    k = max(1, len(loss) // 25)
    ax.plot(np.convolve(loss, np.ones(k) / k, mode="valid"),
            label=f"{name}: val mIoU {mious[name].mean():.3f} ± {mious[name].std():.3f}")
ax.set_xlabel("iteration")
ax.set_ylabel(f"training loss (smoothed, mean of {len(seeds)} seeds)")
ax.legend()
fig.savefig(os.path.join(OUT, "13_pretraining.png"), dpi=90, bbox_inches="tight")
plt.close(fig)

# %% Check
assert len(state) > len(params)  # the buffers travel with the parameters
target = models.deeplab_v2(val.num_classes, "tiny", 8)
models.load_torchvision_resnet(target.backbone, weights)
assert all(np.array_equal(a, state[k]) for k, a in target.backbone.state_dict().items())
for (name, seed), (miou, history) in results.items():
    assert np.isfinite(miou) and np.isfinite([h["loss"] for h in history]).all(), (name, seed)
print("Check passed.")


# %% Exercise — move a backbone (a solution: lessons/solutions/13_pretraining.py)
# Given the state dict of a trained DeepLab (``source``: names like "backbone.layer1.0.conv1.
# weight", "head.branches.0.weight") and a fresh network ``target`` with another number of
# classes, load every backbone array of ``source`` — parameters and buffers — into
# target.backbone and leave the head as it is.  (target.backbone.load_state_dict takes a dict
# of backbone names without the "backbone." prefix.)
def move_backbone(source, target):
    raise NotImplementedError("your code here")


exercises.run(exercises.check_move_backbone, move_backbone)

# %% Summary — read next
# * DeepLab's backbone is pre-trained; only the head starts from random.  Moving a backbone
#   means its parameters and its batch-norm statistics.
# * At lesson scale (section 3: 24 target images, 400 iterations, 3 seeds), a backbone
#   pre-trained on object-versus-background lifted val mIoU from 0.206 ± 0.007 to
#   0.255 ± 0.008, every seed by +0.029 or more (with machine C's own OpenBLAS kernel:
#   0.211 → 0.242, +0.009 or more) — the paper's direction, on a toy scale.
# Next: lesson 09 — the learning-rate policy (network track).
