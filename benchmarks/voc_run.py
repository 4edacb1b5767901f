"""A short DeepLab v2 run on a VOC-layout folder from torchvision-format weights: the README's
``train`` (frozen batch norm, ``--pretrained``) and ``eval`` commands at a small scale, on the
CPU or a GPU.

No pre-trained weights can be downloaded here, so the run starts from stand-in weights in
torchvision's ``.pth`` format: a random ResNet whose batch-norm statistics are those of the
folder's photographs (what pre-trained statistics are; frozen default statistics would
explode), the last batch norm of each residual branch scaled down as training leaves it.  It
checks the path (loading, frozen batch norm, the device, the checkpoint, evaluation), not a
score: with three photographs and random features the mIoU means nothing.

    python benchmarks/voc_run.py --data ../shared/data/voc_mini --device cuda --out runs/voc

It prints the logged loss at the first and last iterations, the median images/s and the eval
command's scores.  Needs PyTorch to write the ``.pth`` file.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np


def stand_in_weights(path, backbone, data_dir, crop=97):
    """Write torchvision-format weights of a random ``backbone`` (see the module docstring)."""
    from tinydeeplab import data, models, pth

    ds = data.VOCSegmentation(str(data_dir), "train")
    rng = np.random.default_rng(0)
    x = np.stack([data.train_transform(*ds[i], rng, crop, None)[0] for i in range(len(ds))])
    net = models.ResNet(backbone, 8)
    for name, m in net.named_modules():
        if name.rstrip(".").endswith("bn3"):
            m.weight.data *= 0.1
    models.calibrate_batch_norm(net, x)
    pth.save(str(path), net.state_dict())


def _cli(*args):
    out = subprocess.run([sys.executable, "-m", "tinydeeplab.cli", *args], capture_output=True,
                         text=True)
    if out.returncode != 0:
        sys.exit(f"tinydeeplab {args[0]} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def run(data_dir, out_dir, device="cpu", backbone="resnet101", iterations=20, batch_size=2,
        crop=161, lr=1e-4):
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, f"stand-in-{backbone}.pth")
    stand_in_weights(weights, backbone, data_dir)
    run_dir = os.path.join(out_dir, "run")
    _cli("train", "--data", str(data_dir), "--split", "train", "--out", run_dir,
         "--backbone", backbone, "--pretrained", weights, "--freeze-bn", "--lr", str(lr),
         "--batch-size", str(batch_size), "--crop", str(crop), "--iterations", str(iterations),
         "--device", device)
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    speed = np.median([r["images_per_s"] for r in log[1:]] or [log[0]["images_per_s"]])
    print(f"# {backbone} from torchvision-format stand-in weights, frozen batch norm, "
          f"{iterations} iterations of {batch_size} × {crop}², device {device}")
    print(f"loss: {log[0]['loss']:.3f} at iteration 1, {log[-1]['loss']:.3f} at {len(log)}; "
          f"median {speed:.2f} images/s")
    print(_cli("eval", "--data", str(data_dir), "--split", "val", "--checkpoint",
               os.path.join(run_dir, "checkpoint.npz"), "--device", device).strip())
    return log


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a VOC-layout folder (train and val lists)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backbone", default="resnet101",
                   choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--crop", type=int, default=161)
    args = p.parse_args(argv)
    for name in ("iterations", "batch_size", "crop"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    run(args.data, args.out, args.device, args.backbone, args.iterations, args.batch_size,
        args.crop)


if __name__ == "__main__":
    main()
