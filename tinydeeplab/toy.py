"""A toy run of the lower stack alone: our atrous-convolution kernels, autograd, loss and SGD
train a 4-layer atrous network (no ResNet, no data files) to segment textured shapes, on the
CPU, in seconds.  Used by the lessons; ``tinydeeplab demo`` is the full DeepLab run.

Toy problem (generated, seeded): 48×48 images of a noisy background with discs of one texture
(class 1, fine stripes) and squares of another (class 2, checkerboard), in the *same* colour
range, so the network has to look at texture and shape over a neighbourhood — which dilated
3×3 layers (rates 1, 2, 4) give it without downsampling.  Pixels on object borders are void
(255), as in VOC, and ignored by loss and metric.
"""
import json
import time

import numpy as np

from . import functional as F
from .autograd import Tensor, no_grad
from .metrics import ConfusionMatrix
from .optim import SGD

CLASS_NAMES = ["background", "striped disc", "checkered square"]


def make_toy_batch(n, size=48, seed=0):
    """Images (n, 3, size, size) float32 and labels (n, size, size) int64 in {0, 1, 2, 255}."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, 3, size, size), dtype=np.float32)
    labels = np.zeros((n, size, size), dtype=np.int64)
    for k in range(n):
        image = rng.normal(0.5, 0.15, (size, size))  # background: noise
        label = np.zeros((size, size), dtype=np.int64)
        for _ in range(rng.integers(1, 4)):
            cls = rng.integers(1, 3)
            r = rng.integers(5, 12)
            cy, cx = rng.integers(r, size - r, 2)
            if cls == 1:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                texture = 0.5 + 0.4 * np.sign(np.sin(yy * np.pi / 2 + rng.random() * 6))
            else:
                inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
                texture = 0.5 + 0.4 * (((yy // 2) + (xx // 2)) % 2 * 2 - 1)
            image[inside] = texture[inside] + rng.normal(0, 0.1, inside.sum())
            label[inside] = cls
        # void borders: pixels whose 3×3 neighbourhood holds two classes
        padded = np.pad(label, 1, mode="edge")
        neighbours = [padded[1 + dy:1 + dy + size, 1 + dx:1 + dx + size]
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        border = np.any([nb != label for nb in neighbours], axis=0)
        label[border] = 255
        tint = rng.uniform(0.8, 1.2, 3)  # colour carries no class information
        images[k] = (image[None] * tint[:, None, None] - 0.5).astype(np.float32)
        labels[k] = label
    return images, labels


def init_params(rng, widths=(3, 16, 16, 16), num_classes=3):
    """He-initialised weights of three dilated 3×3 layers and a 1×1 classifier."""
    params = []
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        w = rng.normal(0, np.sqrt(2.0 / (c_in * 9)), (c_out, c_in, 3, 3)).astype(np.float32)
        params += [Tensor(w, requires_grad=True),
                   Tensor(np.zeros(c_out, np.float32), requires_grad=True)]
    w = rng.normal(0, 0.01, (num_classes, widths[-1], 1, 1)).astype(np.float32)
    params += [Tensor(w, requires_grad=True),
               Tensor(np.zeros(num_classes, np.float32), requires_grad=True)]
    return params


def forward(params, x, rates=(1, 2, 4)):
    """Dilated 3×3 convolutions with padding = rate keep the 48×48 resolution throughout."""
    h = x
    for i, d in enumerate(rates):
        h = F.relu(F.conv2d(h, params[2 * i], params[2 * i + 1], padding=d, dilation=d))
    return F.conv2d(h, params[-2], params[-1])


def evaluate(params, images, labels, batch=16):
    cm = ConfusionMatrix(3, class_names=CLASS_NAMES)
    with no_grad():
        for s in range(0, len(images), batch):
            logits = forward(params, Tensor(images[s:s + batch]))
            cm.update(logits.data.argmax(axis=1), labels[s:s + batch])
    return cm.scores()


def run(iterations=300, batch=8, lr=0.05, seed=0, log=print):
    rng = np.random.default_rng(seed)
    train_x, train_y = make_toy_batch(256, seed=seed)
    val_x, val_y = make_toy_batch(64, seed=seed + 1)
    params = init_params(rng)
    opt = SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    before = evaluate(params, val_x, val_y)
    log(f"toy atrous segmentation: {len(train_x)} train / {len(val_x)} val images, "
        f"{iterations} SGD steps of {batch}")
    t0 = time.perf_counter()
    for it in range(iterations):
        idx = rng.choice(len(train_x), batch, replace=False)
        opt.lr = lr * (1 - it / iterations) ** 0.9  # DeepLab's poly policy
        loss = F.cross_entropy(forward(params, Tensor(train_x[idx])), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 25 == 0 or it == iterations - 1:
            log(f"  step {it:4d}  loss {loss.item():.3f}  lr {opt.lr:.4f}")
    seconds = time.perf_counter() - t0
    after = evaluate(params, val_x, val_y)
    log(f"trained in {seconds:.1f} s ({iterations * batch / seconds:.1f} images/s)")
    log(f"val mIoU {before['miou']:.3f} before training -> {after['miou']:.3f} after; "
        f"pixel accuracy {after['pixel_acc']:.3f}")
    log("per-class IoU: " + json.dumps({k: round(v, 3) for k, v in
                                        after["per_class_iou"].items()}))
    return {"before": before, "after": after, "seconds": seconds}
