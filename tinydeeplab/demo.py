"""``tinydeeplab demo``: the whole pipeline on the CPU in a few minutes, nothing to download.

``--device cuda`` trains a larger demo on a GPU (``CUDA_DEFAULTS``: four times the images,
larger crops, batch 10) into its own cache folder; sized to take about the CPU demo's time,
which has yet to be timed on a GPU.

1. Generate the synthetic VOC-layout set (textured shapes at several scales on textured
   backgrounds, void borders) into a cache folder — once; later runs reuse it.
2. Train the "tiny" DeepLab v2 (ResNet-style backbone, output stride 8, ASPP) with SGD,
   momentum, poly learning rate and the head at 10×.
3. Evaluate on the validation split without and with the dense CRF.
4. Save training curves, a picture grid (image | ground truth | prediction | + CRF), scores.
"""
import json
import os
import shutil
import time

from . import crf as crf_module
from .data import VOCSegmentation, make_synthetic_voc
from .evaluate import evaluate, predict_probs
from .models import atomic_write
from .train import TrainConfig, train
from .viz import plot_curves, save_grid

# Sized for ≤ 10 minutes on 2 cores (measured in benchmarks/RESULTS.md).
DEFAULTS = dict(n_train=200, n_val=50, size=128, crop=113, batch_size=4, iterations=4000,
                lr=0.02)
# The GPU demo: more and larger images, the paper's batch of 10, the same schedule length.
CUDA_DEFAULTS = dict(n_train=800, n_val=100, size=192, crop=161, batch_size=10, iterations=4000,
                     lr=0.02)
# DeepLab v2's CRF parameters for ResNet-101 on VOC (crf.dense_crf's defaults).  Tried on
# this set after 1500 iterations: they added 3.1 points of mIoU; widths scaled to the smaller
# images (bilateral 20 px / 10 levels, 10 / 20, 30 / 5, 5 / 30) added 2.1-2.4, 3.0, 2.4, 0.9.
CRF_PARAMS = dict(iterations=10, pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=67, bi_rgb_std=3)


def cache_dir(device="cpu"):
    base = os.environ.get("TDL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "tinydeeplab", "demo")
    return base if device == "cpu" else base + "-" + device


def _dataset(root, cfg, seed, log):
    marker = os.path.join(root, "ImageSets", "Segmentation", "val.txt")
    settings = os.path.join(root, "settings.json")
    wanted = {"n_train": cfg["n_train"], "n_val": cfg["n_val"], "size": cfg["size"],
              "seed": seed}
    if os.path.exists(marker) and os.path.exists(settings):
        with open(settings) as f:
            if json.load(f) == wanted:
                log(f"data: reusing {root}")
                return root
    shutil.rmtree(root, ignore_errors=True)
    log(f"data: generating {cfg['n_train']} + {cfg['n_val']} synthetic images in {root}")
    make_synthetic_voc(root, cfg["n_train"], cfg["n_val"], cfg["size"], seed)
    with open(settings, "w") as f:
        json.dump(wanted, f)
    return root


def run(out_dir=None, iterations=None, seed=0, log=print, progress=True, device="cpu",
        **overrides):
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    cfg = {**(DEFAULTS if device == "cpu" else CUDA_DEFAULTS), **overrides}
    if iterations is not None:
        cfg["iterations"] = iterations
    out = os.path.abspath(out_dir or cache_dir(device))
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"demo folder {out!r} is not writable")
    t_start = time.perf_counter()
    root = _dataset(os.path.join(out, "data"), cfg, seed, log)
    run_dir = os.path.join(out, "run")
    shutil.rmtree(run_dir, ignore_errors=True)  # our own folder: a fresh run each time
    tc = TrainConfig(root, run_dir, crop=cfg["crop"], scale=(0.75, 1.25),
                     batch_size=cfg["batch_size"], iterations=cfg["iterations"], lr=cfg["lr"],
                     checkpoint_every=max(100, cfg["iterations"] // 10), seed=seed,
                     device=device)
    log(f"train: tiny DeepLab v2 (ASPP, output stride 8) on {device}, {tc.iterations} "
        f"iterations of {tc.batch_size} crops of {tc.crop}×{tc.crop}")
    model, history = train(tc, log=log, progress=progress)
    t_train = time.perf_counter() - t_start
    val = VOCSegmentation(root, "val")
    scores = evaluate(model, val, crf=True, crf_params=CRF_PARAMS, device=device,
                      progress=progress)
    plot_curves(history, os.path.join(out, "curves.png"))
    rows = []
    for i in range(4):
        image, label = val[i]
        probs = predict_probs(model, image, device=device)
        refined = crf_module.dense_crf(image, probs, **CRF_PARAMS)
        rows.append((image, label, probs.argmax(0), refined.argmax(0)))
    save_grid(rows, os.path.join(out, "predictions.png"))
    summary = {"miou": scores["plain"]["miou"], "miou_crf": scores["crf"]["miou"],
               "train_seconds": t_train, "total_seconds": time.perf_counter() - t_start,
               "scores": scores, "crf_params": CRF_PARAMS, "config": cfg, "device": device}
    with atomic_write(os.path.join(out, "scores.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"\nval mIoU {summary['miou']:.4f} without CRF, {summary['miou_crf']:.4f} with CRF "
        f"({len(val)} images); training took {t_train:.0f} s, all {summary['total_seconds']:.0f} s")
    for name, iou in scores["crf"]["per_class_iou"].items():
        log(f"    {name:>20s}  {scores['plain']['per_class_iou'][name]:.3f} -> {iou:.3f}")
    log(f"\nwritten to {out}:\n  data/ (the synthetic set)   run/checkpoint.npz   "
        f"run/log.jsonl\n  curves.png   predictions.png   scores.json")
    return summary
