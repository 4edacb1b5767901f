"""Evaluation: logits upsampled bilinearly to the label size, optional multi-scale inputs
(pixel-wise max of the logits, DeepLab v2 §3.2) and optional dense CRF post-processing
(DeepLab's defaults), scored with a confusion matrix."""
import numpy as np

from . import crf as crf_module
from . import functional as F
from .autograd import Tensor, no_grad
from .backend import to_device
from .data import to_input
from .metrics import ConfusionMatrix


def predict_probs(model, image, scales=(1.0,), device="cpu", flip=False):
    """Class probabilities (C, H, W) float32 for one uint8 (H, W, 3) image.  Each scale's
    logits are upsampled to the image; with ``flip`` they are the mean of the image's and
    its left-right mirror's (mirrored back); scales are fused by pixel-wise max (DeepLab
    v2's MSC)."""
    H, W = image.shape[:2]
    x = Tensor(to_input(image)[None]).to(device)
    fused = None
    with no_grad():
        model.eval()
        for s in scales:
            xs = x if s == 1.0 else F.interpolate(x, (max(1, round(H * s)), max(1, round(W * s))))
            logits = F.interpolate(model(xs), (H, W))  # bilinear, align_corners=False
            if flip:
                mirrored = Tensor(xs.data[..., ::-1].copy())
                back = F.interpolate(model(mirrored), (H, W)).data[..., ::-1]
                logits = Tensor((logits.data + back) * 0.5)
            fused = logits if fused is None else F.maximum(fused, logits)
        probs = F.softmax(fused, axis=1)
    return np.asarray(to_device(probs.data[0], "cpu"), dtype=np.float32)


def evaluate(model, dataset, scales=(1.0,), crf=False, crf_params=None, device="cpu",
             limit=None, progress=False, flip=False, matrices=None):
    """Scores without CRF (and with, when ``crf``): {"plain": scores, "crf": scores}.
    ``matrices``: a dict that receives the ConfusionMatrix of each."""
    C = dataset.num_classes
    plain = ConfusionMatrix(C, class_names=dataset.class_names)
    refined = ConfusionMatrix(C, class_names=dataset.class_names) if crf else None
    n = len(dataset) if limit is None else min(limit, len(dataset))
    indices = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="eval", unit="img")
    for i in indices:
        image, label = dataset[i]
        probs = predict_probs(model, image, scales, device, flip)
        plain.update(probs.argmax(0), label)
        if crf:
            q = crf_module.dense_crf(image, probs, **(crf_params or {}))
            refined.update(q.argmax(0), label)
    out = {"plain": plain.scores()}
    if crf:
        out["crf"] = refined.scores()
    if matrices is not None:
        matrices["plain"] = plain
        if crf:
            matrices["crf"] = refined
    return out
