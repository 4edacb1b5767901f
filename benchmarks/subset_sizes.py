"""mIoU against the number of training images, on the synthetic set (the real data at hand is
three VOC pairs, too few to measure anything): the demo's tiny network and schedule trained
on the first N of the 200 training images, scored on the 50 validation images without and
with the dense CRF, over seeds.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/subset_sizes.py \
        --out benchmarks/subset_sizes.json
"""
import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np


def main():
    from tinydeeplab import demo
    from tinydeeplab.data import VOCSegmentation
    from tinydeeplab.evaluate import evaluate
    from tinydeeplab.train import TrainConfig, train

    p = argparse.ArgumentParser()
    p.add_argument("--subsets", default="25,50,100,200")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--iterations", type=int, default=demo.DEFAULTS["iterations"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg = demo.DEFAULTS
    work = tempfile.mkdtemp(prefix="tdl-subsets-")
    root = demo._dataset(os.path.join(work, "data"), cfg, 0, print)
    val = VOCSegmentation(root, "val")
    rows = []
    for subset in map(int, args.subsets.split(",")):
        for seed in map(int, args.seeds.split(",")):
            run = os.path.join(work, f"run{subset}_{seed}")
            tc = TrainConfig(root, run, subset=subset, crop=cfg["crop"], scale=(0.75, 1.25),
                             batch_size=cfg["batch_size"], iterations=args.iterations,
                             lr=cfg["lr"], checkpoint_every=args.iterations, seed=seed)
            t0 = time.perf_counter()
            model, _ = train(tc, log=lambda s: None, progress=False)
            seconds = time.perf_counter() - t0
            s = evaluate(model, val, crf=True, crf_params=demo.CRF_PARAMS)
            rows.append({"subset": subset, "seed": seed, "miou": s["plain"]["miou"],
                         "miou_crf": s["crf"]["miou"], "train_seconds": seconds})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(run)
    print(f"{'images':>7s} {'mIoU':>14s} {'mIoU + CRF':>14s}")
    for subset in sorted({r["subset"] for r in rows}):
        r = [x for x in rows if x["subset"] == subset]
        a, b = [x["miou"] for x in r], [x["miou_crf"] for x in r]
        print(f"{subset:7d} {np.mean(a):.3f} [{min(a):.3f}-{max(a):.3f}] "
              f"{np.mean(b):.3f} [{min(b):.3f}-{max(b):.3f}]")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"iterations": args.iterations, "val_images": len(val), "rows": rows},
                      f, indent=1)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
