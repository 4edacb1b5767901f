"""Lesson 9 — The learning-rate policy: "poly" versus "step" on the same budget.

You will learn:
  * DeepLab v2's poly schedule  lr = base · (1 − iter/max_iter)^0.9  and the step schedule
    DeepLab v1 used (÷10 at fixed iterations), side by side;
  * what each does to the training loss, and the validation mIoU they reach for the same
    number of iterations (DeepLab v2 §4.1 reports poly ahead by ~1-3 points on VOC);
  * the 10× head multiplier, and how to read lr off a run's log.

Run:  python lessons/09_learning_rate_policy.py   (TDL_FAST=1 for a smaller, quicker run)
"""
# %% Setup
import json
import os
import shutil

import numpy as np

from tinydeeplab import data, exercises, lessons
from tinydeeplab.evaluate import evaluate
from tinydeeplab.train import TrainConfig, learning_rate, param_groups, train

FAST = lessons.fast()  # TDL_FAST=1: a smaller run (the test suite's smoke test)
OUT = lessons.output_dir()  # figures and runs: $TDL_OUT, else ./lesson_out

# %% 1. The two schedules
iterations = 60 if FAST else 600
base = 0.01
poly = TrainConfig("", "", iterations=iterations, lr=base, lr_policy="poly", power=0.9)
step = TrainConfig("", "", iterations=iterations, lr=base, lr_policy="step",
                   step_size=iterations // 3, gamma=0.1)
lr_poly = [learning_rate(poly, i) for i in range(iterations)]
lr_step = [learning_rate(step, i) for i in range(iterations)]
half = iterations // 2
print(f"at the half-way point: poly {lr_poly[half]:.5f} (= {base} · 0.5^0.9), "
      f"step {lr_step[half]:.5f}")
# the area under the curve — the total distance SGD may travel — is similar; poly spends it
# smoothly and ends at 0, step drops abruptly and then crawls
print(f"Σ lr: poly {sum(lr_poly):.2f}, step {sum(lr_step):.2f}")

# %% 2. Train the same network twice, changing only the schedule
# the set is kept between runs, in a folder named by its settings: a fast run's smaller set
# is never mistaken for the full one (and the other way round)
n_train, n_val = (24, 8) if FAST else (120, 30)
root = os.path.join(OUT, f"data_09_{n_train}x{n_val}_96px_seed9")
if not os.path.exists(os.path.join(root, "classes.txt")):  # (written last: a complete set)
    data.make_synthetic_voc(root, n_train=n_train, n_val=n_val, size=96, seed=9)
runs = {}
for name, cfg in (("poly", poly), ("step", step)):
    run_dir = os.path.join(OUT, f"run_09_{name}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time
    cfg = TrainConfig(root, run_dir, crop=81, scale=(0.75, 1.25), batch_size=4,
                      iterations=iterations, lr=base, lr_policy=cfg.lr_policy,
                      step_size=cfg.step_size, gamma=cfg.gamma, checkpoint_every=10**6, seed=0)
    model, history = train(cfg, log=lambda s: None, progress=False)
    miou = evaluate(model, data.VOCSegmentation(root, "val"))["plain"]["miou"]
    log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    runs[name] = dict(history=history, miou=miou, log=log)
    print(f"{name}: final loss {np.mean([h['loss'] for h in history[-20:]]):.3f}, "
          f"val mIoU {miou:.3f}")
groups = param_groups(model, poly)
print("learning-rate multipliers: backbone 1, head weights "
      f"{groups[1]['lr_mult']:g}, head biases {groups[2]['lr_mult']:g} (no weight decay)")

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
ax[0].plot(lr_poly, label="poly (power 0.9)")
ax[0].plot(lr_step, label=f"step (×0.1 every {iterations // 3})")
ax[0].set_xlabel("iteration")
ax[0].set_ylabel("base learning rate")
ax[0].legend()
for name, run in runs.items():
    loss = np.array([h["loss"] for h in run["history"]])
    k = max(1, len(loss) // 30)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    ax[1].plot(smooth, label=f"{name}: val mIoU {run['miou']:.3f}")
ax[1].set_xlabel("iteration")
ax[1].set_ylabel("training loss (smoothed)")
ax[1].legend()
fig.savefig(os.path.join(OUT, "09_learning_rate_policy.png"), dpi=90, bbox_inches="tight")
plt.close(fig)

# %% Check
assert abs(lr_poly[half] - base * (1 - half / iterations) ** 0.9) < 1e-12
assert lr_step[0] == base and abs(lr_step[-1] - base * 0.01) < 1e-12
for name, run in runs.items():  # the log records the schedule that was actually used
    assert np.allclose([r["lr"] for r in run["log"]], lr_poly if name == "poly" else lr_step)
    losses = [h["loss"] for h in run["history"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), f"{name} did not learn"
print("Check passed.")

# %% Exercise — the poly schedule (a solution: lessons/solutions/09_learning_rate_policy.py)
# DeepLab v2's learning rate at `iteration` (from 0) of `max_iter`: base · (1 − it/max)^power.
# The check compares with the library's train.learning_rate.
def poly_lr(base_lr, iteration, max_iter, power=0.9):
    raise NotImplementedError("your code here")


exercises.run(exercises.check_poly_lr, poly_lr)

# %% Summary — read next
# * Poly decays smoothly to 0; step divides by 10 at fixed iterations.  Compare them over
#   seeds at the same budget before believing a difference.
# * The head's 10× learning rate lets the new classifier catch up with a pre-trained body.
# Next: the CRF track, 07 → 08 → 10.
