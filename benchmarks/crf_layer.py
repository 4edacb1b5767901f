"""The CRF as a trainable layer against post-hoc CRF, on the demo's synthetic set.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/crf_layer.py [--base CKPT]

1. A base network: the demo's (tiny DeepLab v2, 4000 iterations; trained here unless --base
   names a checkpoint of it, e.g. ~/.cache/tinydeeplab/demo/run/checkpoint.npz).
2. Two fine-tunings from it with the same data order, learning rate and number of iterations,
   batch norm frozen (as DeepLab fine-tunes; otherwise the running statistics of the last few
   batches decide the scores more than anything else):
   "plain" (the usual loss at 1/8 resolution) and "layer" (the network ends with
   ``crf.CRFLayer``: 5 mean-field iterations, a learned 5×5 compatibility per kernel and a
   learned output scale; loss on its refined logits plus the loss of the unary logits).
3. Validation mIoU: plain without and with DeepLab's post-hoc CRF (10 iterations), the layer
   model as trained (its own CRF), with 10 iterations at test (as Zheng et al. 2015) — and,
   for information, with the post-hoc CRF on top — on the validation set (on which these
   settings were chosen) and on a held-out set of 150 images from another seed.  Repeated
   for several seeds; an earlier run's trained models are reused (runs are deterministic).
4. A fair choice of test-time iterations: both arms are scored at each of SWEEP mean-field
   iterations (the post-hoc CRF's, the layer's own), each arm's count is chosen on the
   validation set (mean over seeds) and the held-out set reports the chosen ones.
Writes benchmarks/crf_layer_results.json (lesson 08 prints it) and prints a table.
"""
import argparse
import json
import os
import shutil
import sys
import time

import tinydeeplab  # noqa: F401  first: thread set-up before NumPy (tinydeeplab/_threads.py)
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def fine_tune(root, base, out_dir, iterations, lr, crf_iterations, crf_lr_mult, compat, scale,
              seed):
    from tinydeeplab.demo import DEFAULTS
    from tinydeeplab.train import TrainConfig, train

    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = TrainConfig(root, out_dir, crop=DEFAULTS["crop"], scale=(0.75, 1.25),
                      batch_size=DEFAULTS["batch_size"], iterations=iterations, lr=lr,
                      init=base, crf_layer=crf_iterations, crf_lr_mult=crf_lr_mult,
                      crf_unary_loss=crf_iterations > 0, crf_compat=compat,
                      crf_scale=scale, freeze_bn=True, checkpoint_every=10**6, seed=seed)
    t0 = time.perf_counter()
    model, _ = train(cfg, log=lambda s: None, progress=True)
    return model, (time.perf_counter() - t0) / iterations


SWEEP = (5, 10, 15, 20, 30)  # test-time mean-field iterations tried for both arms


def sweep_iterations(model, dataset, layer):
    """mIoU at each test-time iteration count of SWEEP: the post-hoc CRF's (DeepLab's
    parameters) on the plain model's probabilities, or the layer model's own CRF."""
    from tinydeeplab import crf, demo
    from tinydeeplab.evaluate import predict_probs
    from tinydeeplab.metrics import ConfusionMatrix

    C = dataset.num_classes
    scores = {T: ConfusionMatrix(C) for T in SWEEP}
    for i in range(len(dataset)):
        image, label = dataset[i]
        if layer:
            for T in SWEEP:
                model.crf.test_iterations = T
                scores[T].update(predict_probs(model, image).argmax(0), label)
        else:
            probs = predict_probs(model, image)
            params = {**demo.CRF_PARAMS}
            for T in SWEEP:
                params["iterations"] = T
                scores[T].update(crf.dense_crf(image, probs, **params).argmax(0), label)
    return {T: m.scores()["miou"] for T, m in scores.items()}


def run(base=None, iterations=300, lr=0.0005, crf_iterations=5, crf_lr_mult=40.0,
        compat="matrix", scale=True, seeds=(1, 2, 3, 4, 5), out=os.path.join(HERE, "out", "crf_layer")):
    from tinydeeplab import demo
    from tinydeeplab.data import VOCSegmentation, make_synthetic_voc
    from tinydeeplab.evaluate import evaluate
    from tinydeeplab.train import load_model

    os.makedirs(out, exist_ok=True)
    root = demo._dataset(os.path.join(demo.cache_dir(), "data"), demo.DEFAULTS, 0, print)
    if base is None:
        print("training the base network (the demo's, 4000 iterations)")
        summary = demo.run(out_dir=os.path.join(out, "demo"), progress=True)
        base = os.path.join(out, "demo", "run", "checkpoint.npz")
        print(f"base: val mIoU {summary['miou']:.4f}, with CRF {summary['miou_crf']:.4f}")
    val = VOCSegmentation(root, "val")
    path = os.path.join(HERE, "crf_layer_results.json")
    config = {"iterations": iterations, "lr": lr, "crf_iterations": crf_iterations,
              "crf_lr_mult": crf_lr_mult, "compat": compat, "learn_scale": scale,
              "base": os.path.abspath(base)}
    done = {}
    if os.path.exists(path):  # runs are deterministic: keep those of the same settings
        with open(path) as f:
            previous = json.load(f)
        if all(previous.get(k) == v for k, v in config.items()):
            done = {r["seed"]: r for r in previous["runs"]}
    # a held-out set, drawn from another seed and never looked at while choosing settings
    heldout_root = os.path.join(demo.cache_dir(), "heldout")
    if not os.path.exists(os.path.join(heldout_root, "classes.txt")):
        make_synthetic_voc(heldout_root, n_train=1, n_val=150, size=128, seed=12345)
    heldout = VOCSegmentation(heldout_root, "val")
    runs = []
    for seed in seeds:  # the seed sets the order and augmentation of the training batches
        dirs = [os.path.join(out, f"{arm}_{seed}") for arm in ("plain", "layer")]
        if seed in done and all(os.path.exists(os.path.join(d, "checkpoint.npz"))
                                for d in dirs):
            print(f"seed {seed}: trained models kept from an earlier run ({out})")
            plain, _ = load_model(os.path.join(dirs[0], "checkpoint.npz"))
            layer, _ = load_model(os.path.join(dirs[1], "checkpoint.npz"))
            t_plain = done[seed]["seconds_per_step_plain"]
            t_layer = done[seed]["seconds_per_step_layer"]
        else:
            plain, t_plain = fine_tune(root, base, dirs[0], iterations, lr, 0, crf_lr_mult,
                                       compat, scale, seed)
            layer, t_layer = fine_tune(root, base, dirs[1], iterations, lr, crf_iterations,
                                       crf_lr_mult, compat, scale, seed)
        record = {"seed": seed}
        for name, ds in (("", val), ("heldout_", heldout)):
            layer.crf.test_iterations = crf_iterations
            s_plain = evaluate(plain, ds, crf=True, crf_params=demo.CRF_PARAMS)
            s_layer = evaluate(layer, ds, crf=True, crf_params=demo.CRF_PARAMS)
            layer.crf.test_iterations = 10  # Zheng et al.: train unrolled for 5, test with 10
            s_layer10 = evaluate(layer, ds)
            record.update({f"{name}plain": s_plain["plain"]["miou"],
                           f"{name}posthoc": s_plain["crf"]["miou"],
                           f"{name}layer": s_layer["plain"]["miou"],
                           f"{name}layer_test10": s_layer10["plain"]["miou"],
                           f"{name}layer_posthoc": s_layer["crf"]["miou"]})
            for arm, model, is_layer in (("posthoc", plain, False), ("layer", layer, True)):
                for T, miou in sweep_iterations(model, ds, is_layer).items():
                    record[f"{name}{arm}_T{T}"] = miou
        record.update({
            "learned_pos_w": layer.crf.pos_w.data.tolist(),
            "learned_bi_w": layer.crf.bi_w.data.tolist(),
            "learned_scale": float(layer.crf.scale.data) if scale else None,
            "seconds_per_step_plain": t_plain, "seconds_per_step_layer": t_layer})
        runs.append(record)
        print(f"seed {seed}: post-hoc CRF {record['posthoc']:.4f} / {record['heldout_posthoc']:.4f}"
              f", CRF layer (10 at test) {record['layer_test10']:.4f} / "
              f"{record['heldout_layer_test10']:.4f}   (val / held-out)")
    keys = [f"{pre}{k}" for pre in ("", "heldout_") for k in
            ("plain", "posthoc", "layer", "layer_test10", "layer_posthoc")]
    keys += [f"{pre}{arm}_T{T}" for pre in ("", "heldout_") for arm in ("posthoc", "layer")
             for T in SWEEP]
    keys += ["seconds_per_step_plain", "seconds_per_step_layer"]
    result = {**config, "runs": runs, **{k: float(np.mean([r[k] for r in runs])) for k in keys}}
    # each arm's test-time iterations chosen on validation (mean over seeds), then held-out
    for arm in ("posthoc", "layer"):
        best = max(SWEEP, key=lambda T: result[f"{arm}_T{T}"])
        result[f"{arm}_chosen_T"] = best
        result[f"{arm}_chosen"] = result[f"{arm}_T{best}"]
        result[f"heldout_{arm}_chosen"] = result[f"heldout_{arm}_T{best}"]
        result[f"heldout_{arm}_chosen_by_seed"] = [r[f"heldout_{arm}_T{best}"] for r in runs]
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"\nfine-tuning {iterations} iterations (lr {lr}, batch norm frozen), mIoU, mean of "
          f"seeds {list(seeds)}:        val ({len(val)})   held-out ({len(heldout)})")
    for label, k in (("plain", "plain"), ("plain + post-hoc CRF (10 iterations)", "posthoc"),
                     (f"CRF layer ({crf_iterations} iterations)", "layer"),
                     ("CRF layer, 10 iterations at test", "layer_test10"),
                     ("CRF layer + post-hoc CRF", "layer_posthoc")):
        print(f"  {label:40s} {result[k]:.4f}        {result['heldout_' + k]:.4f}")
    print(f"  test-time iterations chosen on validation from {list(SWEEP)}:")
    for label, arm in (("plain + post-hoc CRF", "posthoc"), ("CRF layer", "layer")):
        print(f"  {label + ' (' + str(result[arm + '_chosen_T']) + ' iterations)':40s} "
              f"{result[arm + '_chosen']:.4f}        {result['heldout_' + arm + '_chosen']:.4f}")
    print(f"  time per step: plain {result['seconds_per_step_plain']:.3f} s, with the CRF "
          f"layer {result['seconds_per_step_layer']:.3f} s")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", help="checkpoint of the demo network (else it is trained here)")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.0005)
    p.add_argument("--crf-iterations", type=int, default=5)
    p.add_argument("--crf-lr-mult", type=float, default=40.0)
    p.add_argument("--compat", default="matrix", choices=["potts", "matrix"])
    p.add_argument("--no-scale", dest="scale", action="store_false",
                   help="do not learn a temperature of the layer's output")
    p.add_argument("--seeds", default="1,2,3,4,5", help="fine-tuning seeds, comma-separated")
    p.add_argument("--out", default=os.path.join(HERE, "out", "crf_layer"),
                   help="folder for the fine-tuned models")
    args = p.parse_args(argv)
    run(args.base, args.iterations, args.lr, args.crf_iterations, args.crf_lr_mult, args.compat,
        args.scale, tuple(int(s) for s in args.seeds.split(",")), args.out)


if __name__ == "__main__":
    sys.exit(main())
