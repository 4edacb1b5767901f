"""A training run of ours (``tinydeeplab train``) and of the PyTorch twin on the same data.

    python benchmarks/train_twin.py --device cuda --iterations 1500      # on a GPU
    python benchmarks/train_twin.py --iterations 20 --n-train 8          # a small CPU check

Both start from the same weights (our initialisation for ``--seed``, or ``--pretrained``
backbone weights, copied into the twin), see the same batches in the same order (our Loader
with the same seed), and follow the same schedule: poly learning rate, the head at 10× (its
biases at 20×, no weight decay), momentum 0.9, weight decay 5e-4, the loss at the logits'
1/8 resolution with void ignored.  The twin's update is written out like ours (Caffe's
v ← m·v + lr·(g + λ·w)), not torch.optim's.  Reported: images/s of each (the median over the
iterations after the first five, data loading included), wall time, and the validation mIoU
of both, scored by the same code (the twin's trained weights are copied back into our model
for that).  Without ``--data`` a synthetic VOC-layout set is written under ``--out``.
The two runs follow each other, not in turns, so their images/s carry the machine's drift
between them; ``bench_model.py`` is the in-turns comparison of a step.
"""
import argparse
import json
import os
import sys
import time

import tinydeeplab  # noqa: F401  first: thread set-up before NumPy
import numpy as np

from tinydeeplab.benchmarks import positive_int


def train_twin(cfg, model, dataset, log=print):
    """The twin's training loop on our batches; returns (trained twin, images/s list)."""
    import torch

    from tinydeeplab.benchmarks.torch_twin import twin_of
    from tinydeeplab.data import Loader, train_transform
    from tinydeeplab.train import _batches, downsample_labels, learning_rate

    device = "cuda" if cfg.device == "cuda" else "cpu"
    twin = twin_of(model).to(device).train()
    head = {id(p) for p in twin.heads.parameters()}
    groups = []  # (parameter, lr multiplier, weight decay), as train.param_groups
    for name, p in list(twin.body.named_parameters()) + \
            [(f"heads.{n}", p) for n, p in twin.heads.named_parameters()]:
        if name.startswith("fc."):
            continue
        if id(p) not in head:
            groups.append((p, 1.0, cfg.weight_decay))
        elif name.endswith("bias"):
            groups.append((p, 2 * cfg.head_lr_mult, 0.0))
        else:
            groups.append((p, cfg.head_lr_mult, cfg.weight_decay))
    velocity = {}
    loader = Loader(dataset, cfg.batch_size,
                    lambda image, label, rng: train_transform(image, label, rng, cfg.crop,
                                                              cfg.scale),
                    cfg.seed, workers=cfg.workers)
    batches = _batches(loader, 0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    speeds = []
    for it in range(cfg.iterations):
        t0 = time.perf_counter()
        x, y = next(batches)
        lr = learning_rate(cfg, it)
        logits = twin(torch.tensor(x, device=device))
        target = torch.tensor(downsample_labels(y, tuple(logits.shape[2:])), device=device)
        loss = torch.nn.functional.cross_entropy(logits, target.long(), ignore_index=255)
        for p, _, _ in groups:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p, mult, decay in groups:
                g = p.grad + decay * p if decay else p.grad
                v = velocity.get(p)
                v = lr * mult * g if v is None else cfg.momentum * v + lr * mult * g
                velocity[p] = v
                p -= v
        value = loss.item()  # synchronises, as ours does
        sync()
        speeds.append(cfg.batch_size / (time.perf_counter() - t0))
        if not np.isfinite(value):
            raise FloatingPointError(f"the twin's loss became {value} at iteration {it + 1}")
        if (it + 1) % max(1, cfg.iterations // 10) == 0:
            log(f"twin {it + 1}/{cfg.iterations}: loss {value:.4f}")
    return twin, speeds


def run(args, out=sys.stdout):
    from tinydeeplab import data, models
    from tinydeeplab.benchmarks.torch_twin import copy_twin_into
    from tinydeeplab.evaluate import evaluate
    from tinydeeplab.train import TrainConfig, train

    os.makedirs(args.out, exist_ok=True)
    root = args.data or data.make_synthetic_voc(os.path.join(args.out, "set"), args.n_train,
                                                args.n_val, args.size, seed=1)
    cfg = TrainConfig(root, os.path.join(args.out, "ours"), backbone=args.backbone,
                      crop=args.crop, batch_size=args.batch_size, iterations=args.iterations,
                      lr=args.lr, seed=args.seed, device=args.device,
                      pretrained=args.pretrained, checkpoint_every=args.iterations,
                      workers=args.workers)
    quiet = (lambda s: None) if args.quiet else print
    t0 = time.perf_counter()
    model, history = train(cfg, log=quiet, progress=False)
    wall_ours = time.perf_counter() - t0
    val = data.VOCSegmentation(root, "val")
    miou_ours = evaluate(model.to("cpu"), val)["plain"]["miou"]

    train_set = data.VOCSegmentation(root, "train")
    start = models.deeplab_v2(train_set.num_classes, args.backbone, cfg.output_stride,
                              aspp_rates=tuple(cfg.aspp_rates), seed=args.seed)
    if args.pretrained:
        weights, _ = models.read_pretrained(args.pretrained, args.backbone)
        models.load_torchvision_resnet(start.backbone, weights)
    t0 = time.perf_counter()
    twin, speeds = train_twin(cfg, start, train_set, log=quiet)
    wall_twin = time.perf_counter() - t0
    miou_twin = evaluate(copy_twin_into(twin, start).eval(), val)["plain"]["miou"]

    ips_ours = float(np.median([r["images_per_s"] for r in history[5:]] or
                               [history[-1]["images_per_s"]]))
    ips_twin = float(np.median(speeds[5:] or speeds[-1:]))
    device = args.device
    if device == "cuda":
        import torch

        device = f"cuda ({torch.cuda.get_device_name()}, TF32 "
        device += f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'} in cuDNN)"
    result = {"device": device, "backbone": args.backbone, "batch": args.batch_size,
              "crop": args.crop, "iterations": args.iterations, "train_images": len(train_set),
              "val_images": len(val), "ours": {"images_per_s": ips_ours, "wall_s": wall_ours,
                                               "val_miou": miou_ours},
              "twin": {"images_per_s": ips_twin, "wall_s": wall_twin, "val_miou": miou_twin}}
    print(f"# training run, {args.backbone}, batch {args.batch_size} × {args.crop}², "
          f"{args.iterations} iterations, {len(train_set)} train / {len(val)} val images, "
          f"device {device}", file=out)
    print("| | images/s | wall s | val mIoU |\n|---|---|---|---|", file=out)
    for name in ("ours", "twin"):
        r = result[name]
        print(f"| {name} | {r['images_per_s']:.1f} | {r['wall_s']:.0f} | "
              f"{r['val_miou']:.4f} |", file=out)
    print(f"ours/twin time per image: {ips_twin / ips_ours:.2f}", file=out)
    print(json.dumps(result), file=out)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default="train-twin")
    parser.add_argument("--data", default=None, help="a VOC-layout root (default: synthetic)")
    parser.add_argument("--n-train", type=positive_int, default=800)
    parser.add_argument("--n-val", type=positive_int, default=100)
    parser.add_argument("--size", type=positive_int, default=192, help="synthetic image size")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--crop", type=positive_int, default=161)
    parser.add_argument("--batch-size", type=positive_int, default=10)
    parser.add_argument("--iterations", type=positive_int, default=1000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=positive_int, default=4)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        torch.backends.cudnn.allow_tf32 = False  # float32 like ours
        torch.backends.cuda.matmul.allow_tf32 = False
    run(args)


if __name__ == "__main__":
    main()
