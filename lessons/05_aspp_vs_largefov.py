"""Lesson 5 — ASPP versus LargeFOV: one field of view or four.

You will learn:
  * what DeepLab v1's LargeFOV head (one 3×3 at rate 12, then two 1×1 layers) and v2's Atrous
    Spatial Pyramid Pooling (four parallel 3×3 classifiers at rates 6, 12, 18, 24, logits
    summed) see of an image — drawn, and measured with gradients;
  * why a rate larger than the feature map wastes the kernel (its outer taps read padding);
  * how the two heads compare when trained briefly on the synthetic set, on small and on
    large objects.

Run:  python lessons/05_aspp_vs_largefov.py   (TDL_FAST=1 for a smaller, quicker run)
"""
# %% Setup
import os

import numpy as np

from tinydeeplab import Tensor, data, models
from tinydeeplab.evaluate import predict_probs
from tinydeeplab.train import TrainConfig, train

FAST = os.environ.get("TDL_FAST") == "1"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
os.makedirs(OUT, exist_ok=True)
rng = np.random.default_rng(0)

# %% 1. Fields of view, on paper
# At output stride 8 one feature pixel is 8 image pixels apart from the next.  A 3×3 kernel at
# rate r reads feature pixels −r, 0, +r around its centre: it spans 2r·8 image pixels, on top of
# what each feature pixel already sees through the backbone.
for r in (6, 12, 18, 24):
    print(f"rate {r:2d}: taps {8 * r:3d} px apart, span {16 * r:3d} px "
          f"(LargeFOV uses rate 12; ASPP all four)")

# %% 2. Fields of view, measured: which input pixels move one output logit?
# Backpropagate from the logit at the centre of the map to the image.  The gradient is non-zero
# exactly on the pixels that logit depends on.
SIZE = 385  # 49×49 features: the widest ASPP branch (±24) just fits
x = Tensor(rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32), requires_grad=True)
aspp_net = models.deeplab_v2(5, "tiny", 8, head="aspp", seed=0).eval()
lfov_net = models.deeplab_v2(5, "tiny", 8, head="largefov", seed=0).eval()


def footprint(head_fn, net):
    x.grad = None
    logits = head_fn(net.backbone(x))
    c = logits.shape[2] // 2
    logits[:, :, c, c].sum().backward()
    g = np.abs(x.grad).sum(axis=(0, 1))
    return g > 0


maps = {"LargeFOV (rate 12)": footprint(lfov_net.head, lfov_net)}
for i, r in enumerate(aspp_net.head.rates):
    maps[f"ASPP branch, rate {r}"] = footprint(aspp_net.head.branches[i], aspp_net)
extents = {}
for name, m in maps.items():
    cols = np.nonzero(m.any(axis=0))[0]
    extents[name] = int(cols.max() - cols.min() + 1)
    print(f"{name:>22s}: depends on a {extents[name]}-pixel-wide window")

# Rates beyond the map: on a 129×129 image the features are 17×17, and a rate-24 kernel at the
# centre has all 8 outer taps in the zero padding — it degenerates to a 1×1 classifier
# (DeepLab v3 §3.3 makes the same observation and adds image-level pooling).
feat = 17
valid = {r: sum(0 <= 8 + dy * r < feat and 0 <= 8 + dx * r < feat
                for dy in (-1, 0, 1) for dx in (-1, 0, 1)) for r in (6, 12, 18, 24)}
print("taps inside a 17×17 map, from its centre:", valid)

# %% 3. Train both briefly on the synthetic set
root = os.path.join(OUT, "data_05")
if not os.path.exists(os.path.join(root, "classes.txt")):
    data.make_synthetic_voc(root, n_train=24 if FAST else 120, n_val=8 if FAST else 30,
                            size=96, seed=5)
iterations = 30 if FAST else 500
scores, histories, nets = {}, {}, {}
for head in ("largefov", "aspp"):
    cfg = TrainConfig(root, os.path.join(OUT, f"run_05_{head}"), head=head, crop=81,
                      scale=(0.75, 1.25), batch_size=4, iterations=iterations, lr=0.02,
                      checkpoint_every=10**6, seed=0)
    ckpt = os.path.join(cfg.out_dir, "checkpoint.npz")
    if os.path.exists(ckpt):
        os.remove(ckpt)  # a fresh run each time
    if os.path.exists(os.path.join(cfg.out_dir, "log.jsonl")):
        os.remove(os.path.join(cfg.out_dir, "log.jsonl"))
    nets[head], histories[head] = train(cfg, log=lambda s: None, progress=False)

# %% 4. Small and large objects
# For every object (class region) in the validation images: its IoU with the prediction; split
# at the median object area into "small" and "large".
val = data.VOCSegmentation(root, "val")
objects = {head: [] for head in nets}
for i in range(len(val)):
    image, label = val[i]
    for head, net in nets.items():
        pred = predict_probs(net, image).argmax(0)
        keep = label != 255
        for c in range(1, val.num_classes):
            gt = (label == c) & keep
            if gt.sum() == 0:
                continue
            pc = (pred == c) & keep
            objects[head].append((int(gt.sum()), (gt & pc).sum() / (gt | pc).sum()))
areas = np.array([a for a, _ in objects["aspp"]])
median = np.median(areas)
for head in nets:
    iou = np.array([v for _, v in objects[head]])
    small, large = iou[areas <= median].mean(), iou[areas > median].mean()
    scores[head] = (small, large)
    print(f"{head:>8s}: mean object IoU small {small:.3f}, large {large:.3f} "
          f"(final training loss {np.mean([h['loss'] for h in histories[head][-20:]]):.3f})")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(1, 3, figsize=(13, 4))
image, _ = val[0]
ax[0].imshow(np.kron(image, np.ones((4, 4, 1), np.uint8))[:SIZE, :SIZE])
colours = ["tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple"]
for (name, m), col in zip(maps.items(), colours):
    ys, xs = np.nonzero(m)
    ax[0].add_patch(plt.Rectangle((xs.min(), ys.min()), xs.max() - xs.min(), ys.max() - ys.min(),
                                  fill=False, ec=col, lw=2, label=name))
ax[0].legend(fontsize=7, loc="lower right")
ax[0].set_title(f"what the centre logit sees ({SIZE}×{SIZE} input)", fontsize=9)
ax[0].axis("off")
ax[1].imshow(maps["ASPP branch, rate 24"], cmap="gray")
ax[1].set_title("pixels that move it: ASPP rate-24 branch", fontsize=9)
ax[1].axis("off")
ax[2].bar(np.arange(2) - 0.2, scores["largefov"], 0.4, label="LargeFOV")
ax[2].bar(np.arange(2) + 0.2, scores["aspp"], 0.4, label="ASPP")
ax[2].set_xticks([0, 1], ["small objects", "large objects"])
ax[2].set_ylabel("mean object IoU")
ax[2].set_title(f"after {iterations} iterations", fontsize=9)
ax[2].legend()
fig.savefig(os.path.join(OUT, "05_aspp_vs_largefov.png"), dpi=90, bbox_inches="tight")
plt.close(fig)

# %% Check
assert extents["LargeFOV (rate 12)"] >= 16 * 12
spans = [extents[f"ASPP branch, rate {r}"] for r in (6, 12, 18, 24)]
assert spans == sorted(spans) and spans[-1] >= 16 * 24, spans  # wider rate, wider view
assert valid[24] == 1 and valid[6] == 9
for head in nets:
    losses = [h["loss"] for h in histories[head]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), f"{head} did not learn"
print("Check passed.")
