"""The ``tinydeeplab`` command line: demo, train, eval, predict, crf, export, convert-caffe,
bench.

Bad input ends with a one-line message and exit status 1 (2 for bad arguments), never a
traceback; files are written atomically.
"""
import argparse
import json
import os
import sys

from .benchmarks import existing_file, positive_int  # (argparse type; the package imports nothing heavy)


def _demo(args):
    from . import demo

    demo.run(out_dir=args.out, iterations=args.iterations, seed=args.seed, device=args.device)


def _train(args):
    from .train import TrainConfig, train
    from .viz import plot_curves

    cfg = TrainConfig(
        data_root=args.data, out_dir=args.out, split=args.split, subset=args.subset,
        backbone=args.backbone, output_stride=args.output_stride, head=args.head,
        crop=args.crop, batch_size=args.batch_size, iter_size=args.iter_size,
        iterations=args.iterations, lr=args.lr, lr_policy=args.lr_policy,
        step_size=args.step_size, freeze_bn=args.freeze_bn, seed=args.seed,
        workers=args.workers, checkpoint_every=args.checkpoint_every, device=args.device,
        resume=args.resume, init=args.init, pretrained=args.pretrained,
        crf_layer=args.crf_layer,
        crf_lr_mult=args.crf_lr_mult, crf_compat=args.crf_compat,
        crf_unary_loss=args.crf_unary_loss, crf_scale=args.crf_scale,
        crf_test_iterations=args.crf_test_iterations, msc=(0.75, 0.5) if args.msc else ())
    _, history = train(cfg)
    if history:
        plot_curves(_read_log(os.path.join(args.out, "log.jsonl")),
                    os.path.join(args.out, "curves.png"))
    print(f"checkpoint: {os.path.join(args.out, 'checkpoint.npz')}\n"
          f"log: {os.path.join(args.out, 'log.jsonl')}\ncurves: "
          f"{os.path.join(args.out, 'curves.png')}")


def _read_log(path):
    """The log's records; a torn last line (a run killed while writing it) is left out."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def _scales(text):
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be numbers like 1,0.75,0.5, got {text!r}")
    if not scales or not all(0 < s < float("inf") for s in scales):  # (NaN fails too)
        raise argparse.ArgumentTypeError(f"scales must be positive finite numbers, got "
                                         f"{text!r}")
    return scales


def _eval(args):
    from .crf import read_params
    from .evaluate import evaluate
    from .viz import plot_confusion

    for path in (args.json, args.confusion):  # before the evaluation, not after it
        if path is not None:
            _check_output_file(path)
    crf_params = read_params(args.crf_params) if args.crf_params else None
    model, ds = _model_and_data(args, args.subset)
    matrices = {}
    result = evaluate(model, ds, args.scales, args.crf or crf_params is not None, crf_params,
                      device=args.device, progress=True, flip=args.flip, matrices=matrices)
    names = list(result)
    print(f"{'':>20s} " + " ".join(f"{n:>8s}" for n in names))
    for key in ("miou", "pixel_acc", "mean_acc", "fwiou"):
        print(f"{key:>20s} " + " ".join(f"{result[n][key]:8.4f}" for n in names))
    print("per-class IoU (absent: the class is in neither the masks nor the predictions)")
    for cls in ds.class_names:
        cells = [result[n]["per_class_iou"][cls] for n in names]
        print(f"{cls:>20s} " + " ".join("  absent" if c != c else f"{c:8.4f}" for c in cells))
    if args.confusion:
        name = "crf" if "crf" in matrices else "plain"
        plot_confusion(matrices[name].matrix, ds.class_names, args.confusion,
                       title=f"{args.split}: confusion ({'with' if name == 'crf' else 'no'} CRF)")
        print(f"confusion matrix: {args.confusion}")
    if args.json:
        for n in names:
            result[n]["confusion_matrix"] = matrices[n].matrix.tolist()
        result["settings"] = {"checkpoint": args.checkpoint, "split": args.split,
                              "images": len(ds), "scales": list(args.scales),
                              "flip": args.flip, "crf_params": crf_params}
        _write_json(args.json, result)
        print(f"scores: {args.json}")


def _model_and_data(args, subset):
    """The checkpoint's network and the checked data split it is to be scored on."""
    from .data import VOCSegmentation, require_valid
    from .train import load_model

    model, config = load_model(args.checkpoint, args.device)
    require_valid(args.data, args.split, subset)
    ds = VOCSegmentation(args.data, args.split, subset)
    if ds.num_classes != config["num_classes"]:
        raise ValueError(f"the checkpoint predicts {config['num_classes']} classes but the data "
                         f"set has {ds.num_classes}")
    return model, ds


def _strict(obj):
    """JSON without NaN tokens (which strict parsers reject): NaN and inf become null."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def _check_output_file(path):
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder!r} does not exist")


def _write_json(path, obj):
    from .models import atomic_write

    text = json.dumps(_strict(obj), indent=2, allow_nan=False)
    with atomic_write(path, "w") as f:
        f.write(text + "\n")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif")


def _predict_inputs(folder):
    """The images of ``folder`` (regular files with an image suffix, sorted), and what was
    left out: a FIFO or a socket would hang the reader, other files are not images."""
    images, skipped = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):  # follows links; False for FIFOs, sockets, folders
            if not os.path.isdir(path):
                skipped.append(f"{name} (not a regular file)")
            continue
        if name.lower().endswith(IMAGE_SUFFIXES):
            images.append(path)
        elif not name.startswith("."):
            skipped.append(name)
    return images, skipped


def _predict_outputs(paths, out):
    """Each input's mask and overlay names in ``out``: ``<stem>.png``, or, where two inputs
    share a stem (x.jpg, x.png), ``<stem>_<suffix>.png`` for each of them.  Refuses (before
    anything is written) any name that is one of the inputs."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    names = []
    for path, stem in zip(paths, stems):
        if stems.count(stem) > 1:
            stem = f"{stem}_{os.path.splitext(path)[1][1:].lower()}"
        names.append((os.path.join(out, f"{stem}.png"), os.path.join(out, f"{stem}_overlay.jpg")))
    inputs = {os.path.realpath(p) for p in paths}
    for mask, overlay in names:
        for target in (mask, overlay):
            if os.path.realpath(target) in inputs:
                raise FileExistsError(f"writing {target} would overwrite an input image; give "
                                      "--out a folder other than the images'")
    if len({m for m, _ in names}) != len(names):
        raise ValueError("two inputs would write the same output name")
    return names


def _predict(args):
    from PIL import Image

    from . import crf as crf_module
    from .data import read_image, save_image, write_mask
    from .evaluate import predict_probs
    from .train import load_model
    from .viz import overlay

    crf_params = crf_module.read_params(args.crf_params) if args.crf_params else None
    if os.path.isdir(args.input):
        paths, skipped = _predict_inputs(args.input)
        if skipped:
            print(f"skipped {len(skipped)} files that are not images: "
                  f"{', '.join(skipped[:5])}{' …' if len(skipped) > 5 else ''}")
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in "
                                    f"{args.input!r}")
    elif os.path.isfile(args.input):
        paths = [args.input]
    elif os.path.exists(args.input):
        raise ValueError(f"input {args.input!r} is neither an image file nor a folder")
    else:
        raise FileNotFoundError(f"input {args.input!r} does not exist")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise NotADirectoryError(f"--out {args.out!r} exists and is not a folder")
    outputs = _predict_outputs(paths, args.out)
    model, _ = load_model(args.checkpoint, args.device)
    os.makedirs(args.out, exist_ok=True)
    for path, (mask_path, overlay_path) in zip(paths, outputs):
        image = read_image(path)
        probs = predict_probs(model, image, args.scales, args.device, args.flip)
        if args.crf or crf_params is not None:
            probs = crf_module.dense_crf(image, probs, **(crf_params or {}))
        mask = probs.argmax(0).astype("uint8")
        write_mask(mask_path, mask)
        save_image(Image.fromarray(overlay(image, mask)), overlay_path, quality=90)
        print(mask_path)


def _crf(args):
    import numpy as np

    from . import crf as crf_module
    from .data import read_image, write_mask

    _check_output_file(args.out)  # before the work, not after it
    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out {args.out!r}: the mask is written as a .png (palette PNG: "
                         "lossless class indices)")
    image = read_image(args.image)
    if not os.path.isfile(args.probs):
        raise FileNotFoundError(f"probabilities file {args.probs!r} does not exist")
    try:
        probs = np.load(args.probs).astype(np.float32)
    except Exception as e:
        raise ValueError(f"{args.probs!r} is not a readable .npy array: {e}") from None
    q = crf_module.dense_crf(image, probs, iterations=args.iterations, pos_w=args.pos_w,
                             pos_xy_std=args.pos_xy_std, bi_w=args.bi_w,
                             bi_xy_std=args.bi_xy_std, bi_rgb_std=args.bi_rgb_std)
    write_mask(args.out, q.argmax(0))
    print(args.out)


def _check_data(args):
    from .data import check_dataset

    report = check_dataset(args.data, args.split, args.subset, args.workers)
    total = sum(report["pixels"].values()) or 1
    print(f"{report['list_file']}: {report['images']} images")
    print(f"{'class':>20s} {'pixels':>12s} {'share':>7s}")
    for name, n in report["pixels"].items():
        print(f"{name:>20s} {n:12d} {100 * n / total:6.2f}%")
    if report["absent_classes"]:
        print(f"classes with no pixel in {args.split!r}: {', '.join(report['absent_classes'])}")
    if report["problems"]:
        print(f"{len(report['problems'])} problems:")
        for p in report["problems"]:
            print(f"  {p}")
        sys.exit(1)
    print("no problems found")


def _tune_crf(args):
    from . import tune

    _check_output_file(args.out)
    model, ds = _model_and_data(args, None)
    result = tune.search(model, ds, args.subset, scales=args.scales, flip=args.flip,
                         device=args.device, workers=args.workers, holdout=args.holdout,
                         progress=True)
    print(f"{'bi_w':>6s} {'bi_xy_std':>10s} {'bi_rgb_std':>11s} {'mIoU':>8s}")
    for row in result["table"][:10]:
        print(f"{row['bi_w']:6g} {row['bi_xy_std']:10g} {row['bi_rgb_std']:11g} "
              f"{row['miou']:8.4f}")
    n, gain = result["split_images"], result["best_miou"] - result["default"]["miou"]
    print(f"on the first {n} images of {args.split!r}: no CRF {result['no_crf_miou']:.4f}, "
          f"DeepLab's defaults {result['default']['miou']:.4f}, best "
          f"{result['best_miou']:.4f} ({gain:+.4f}) in {result['seconds']:.0f} s")
    if "holdout" in result:
        h = result["holdout"]
        print(f"on the next {h['images']} images (not searched): defaults "
              f"{h['default_miou']:.4f}, best {h['best_miou']:.4f} "
              f"({h['best_miou'] - h['default_miou']:+.4f})")
    result["settings"] = {"checkpoint": args.checkpoint, "split": args.split,
                          "scales": list(args.scales), "flip": args.flip}
    _write_json(args.out, result)
    print(f"parameters: {args.out} (eval/predict --crf-params {args.out})")


def _export(args):
    from . import models
    from .train import load_model

    model, config = load_model(args.checkpoint)
    arrays = model.state_dict()
    if args.out.endswith(".pth"):
        from . import pth

        pth.save(args.out, arrays)
    elif args.out.endswith(".npz"):
        import numpy as np

        with models.atomic_write(args.out) as f:
            np.savez(f, **arrays)
    else:
        raise ValueError(f"--out must end in .npz or .pth, got {args.out!r}")
    print(f"{args.out}: {len(arrays)} arrays; backbone.* in torchvision ResNet names "
          f"({config['backbone']}, output stride {config['output_stride']}, "
          f"{config.get('style', 'torchvision')} layout), head.* the "
          f"{config['head'].upper()} classifier ({config['num_classes']} classes)")


def _convert_caffe(args):
    from . import caffe

    config = caffe.convert(args.caffemodel, args.out, args.backbone)
    what = (f"DeepLab v2 {config['backbone']} + ASPP, {config['num_classes']} classes: "
            f"tinydeeplab eval --checkpoint {args.out} ..." if config["num_classes"] else
            f"{config['backbone']} backbone: tinydeeplab train --pretrained {args.out} ...")
    print(f"{args.out}: {what}")


def _bench(args):
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("tinydeeplab bench compares against PyTorch, which is not installed: "
                 "pip install 'tinydeeplab[test]'")
    from .benchmarks import bench_model

    if args.models and args.what not in ("model", "all"):
        sys.exit(f"tinydeeplab bench: --models is for 'bench model' (or 'all'), not "
                 f"'{args.what}'")
    if args.rounds is not None and args.what == "crf":
        sys.exit("tinydeeplab bench: --rounds is for 'bench conv', 'bench aspp' and 'bench "
                 "model' (crf: --repeat rounds in turns)")
    try:  # before any timing starts
        models = bench_model.choose_models(args.models, args.device)
    except ValueError as e:
        sys.exit(f"tinydeeplab bench: {e}")
    rounds = {} if args.rounds is None else {"rounds": args.rounds}
    if args.what in ("crf", "all"):
        try:
            import pydensecrf  # noqa: F401
        except ImportError:
            sys.exit("tinydeeplab bench crf compares against pydensecrf, which is not "
                     "installed: pip install 'tinydeeplab[test]'")
    if args.what in ("conv", "all"):
        from .benchmarks import bench_conv

        bench_conv.run(device=args.device, threads=args.threads, repeat=args.repeat, **rounds)
    if args.what == "aspp" or (args.what == "all" and args.device == "cpu"):
        from .benchmarks import bench_aspp

        bench_aspp.run(args.threads, args.repeat, **rounds)
    if args.what in ("crf", "all"):
        from .benchmarks import bench_crf

        bench_crf.run(device=args.device, repeat=args.repeat,
                      photo=bench_crf.PHOTO if args.image is None else args.image)
    if args.what in ("model", "all"):
        if args.device == "cuda":
            bench_model.run_cuda(args.repeat, cases=models, **rounds)
        else:
            bench_model.run(args.threads, args.repeat, models=models, **rounds)


def build_parser():
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tinydeeplab", description="DeepLab v2 rebuilt by hand: kernels, autograd, CRF.")
    parser.add_argument("--version", action="version", version=f"tinydeeplab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="generate a synthetic set, train the tiny DeepLab on the "
                                    "CPU, evaluate with and without CRF, save pictures")
    p.add_argument("--out", default=None, help="folder for everything (default: "
                   "$TDL_CACHE or ~/.cache/tinydeeplab/demo)")
    p.add_argument("--iterations", type=int, default=None, help="training iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: a larger demo (800 images of 192², batch 10) on the GPU, in "
                   "its own cache folder (demo-cuda)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("train", help="train DeepLab v2 on a VOC-layout data set")
    p.add_argument("--data", required=True, help="data set root (VOC layout)")
    p.add_argument("--out", required=True, help="folder for checkpoint.npz, log.jsonl, curves")
    p.add_argument("--split", default="train")
    p.add_argument("--subset", type=int, default=None, help="use the first N listed images")
    p.add_argument("--backbone", default="tiny",
                   choices=["tiny", "resnet18", "resnet34", "resnet50", "resnet101"])
    p.add_argument("--output-stride", type=int, default=8, choices=[8, 16])
    p.add_argument("--head", default="aspp", choices=["aspp", "largefov"])
    p.add_argument("--crop", type=int, default=321)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--iter-size", type=int, default=1, help="batches accumulated per update")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--lr-policy", default="poly", choices=["poly", "step"])
    p.add_argument("--step-size", type=int, default=2000, help="for --lr-policy step")
    p.add_argument("--freeze-bn", action="store_true", help="frozen batch norm (as DeepLab)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (fine-tuning)")
    p.add_argument("--pretrained", metavar="WEIGHTS",
                   help="backbone weights: a torchvision ResNet state dict (.pth, read "
                        "without PyTorch, or .npz) or DeepLab v2's .caffemodel")
    p.add_argument("--crf-layer", type=int, default=0, metavar="T",
                   help="end the network with a trainable CRF of T mean-field iterations "
                        "(DeepLab's kernels; Potts weights learned), trained end to end")
    p.add_argument("--crf-lr-mult", type=float, default=1.0,
                   help="learning-rate multiplier of the CRF layer's weights")
    p.add_argument("--crf-compat", default="potts", choices=["potts", "matrix"],
                   help="the CRF layer learns two Potts weights, or a C×C matrix per kernel")
    p.add_argument("--crf-unary-loss", action="store_true",
                   help="also train the logits before the CRF layer (loss at 1/8)")
    p.add_argument("--crf-scale", action="store_true",
                   help="learn a temperature of the CRF layer's output")
    p.add_argument("--crf-test-iterations", type=int, metavar="T",
                   help="the CRF layer's iterations at test time (default: --crf-layer)")
    p.add_argument("--msc", action="store_true",
                   help="multi-scale training (DeepLab v2's MSC): the batch also at scales "
                        "0.75 and 0.5, a loss on each scale and on their max fusion (about "
                        "1.8× the step time); evaluate with eval --scales 1,0.75,0.5")
    p.add_argument("--workers", type=int, default=2, help="data loading threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="mIoU and per-class IoU of a checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--scales", type=_scales, default=(1.0,), help="e.g. 1,0.75,0.5")
    p.add_argument("--flip", action="store_true",
                   help="average each scale's logits with its left-right mirror's")
    p.add_argument("--crf", action="store_true", help="also score after the dense CRF")
    p.add_argument("--crf-params", metavar="FILE",
                   help="the CRF's parameters from this JSON (tune-crf's output); implies --crf")
    p.add_argument("--json", default=None, help="write the scores (and confusion matrices) "
                                                "to this file; absent classes are null")
    p.add_argument("--confusion", metavar="PNG", default=None,
                   help="draw the confusion matrix (after the CRF if --crf) to this picture")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="palette PNGs and overlays for an image or a folder")
    p.add_argument("input", help="an image or a folder of images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scales", type=_scales, default=(1.0,))
    p.add_argument("--flip", action="store_true",
                   help="average each scale's logits with its left-right mirror's")
    p.add_argument("--crf", action="store_true")
    p.add_argument("--crf-params", metavar="FILE",
                   help="the CRF's parameters from this JSON (tune-crf's output); implies --crf")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=_predict)

    p = sub.add_parser("crf", help="apply the dense CRF to an image and saved probabilities")
    p.add_argument("--image", required=True)
    p.add_argument("--probs", required=True, help=".npy array (C, H, W) of probabilities")
    p.add_argument("--out", required=True, help="palette PNG to write")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--pos-w", type=float, default=3)
    p.add_argument("--pos-xy-std", type=float, default=1)
    p.add_argument("--bi-w", type=float, default=4)
    p.add_argument("--bi-xy-std", type=float, default=67)
    p.add_argument("--bi-rgb-std", type=float, default=3)
    p.set_defaults(func=_crf)

    p = sub.add_parser("check-data", help="read every image and mask of a split once: all "
                                          "problems at once, and the class pixel counts")
    p.add_argument("--data", required=True, help="data set root (VOC layout)")
    p.add_argument("--split", default="train")
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--workers", type=int, default=2, help="reading threads")
    p.set_defaults(func=_check_data)

    p = sub.add_parser("tune-crf", help="search the dense CRF's w1, θα, θβ on a split's "
                                        "first images; write the best as JSON")
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--subset", type=int, default=100, help="tune on the first N images")
    p.add_argument("--holdout", type=int, default=0,
                   help="also compare defaults and best on the next N images")
    p.add_argument("--out", default="crf_params.json")
    p.add_argument("--scales", type=_scales, default=(1.0,))
    p.add_argument("--flip", action="store_true")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes scoring candidates (default: one per core)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=_tune_crf)

    p = sub.add_parser("export", help="a trained checkpoint's weights as a plain state dict "
                                      "(.npz, or .pth with PyTorch) in torchvision names")
    p.add_argument("checkpoint")
    p.add_argument("out", help="out.npz or out.pth")
    p.set_defaults(func=_export)

    p = sub.add_parser("convert-caffe", help="DeepLab v2's released .caffemodel into a "
                                             "checkpoint (no Caffe needed)")
    p.add_argument("caffemodel")
    p.add_argument("out", help="out.npz: a checkpoint (eval/predict/--init) or, for an "
                               "ImageNet model, a backbone (--pretrained)")
    p.add_argument("--backbone", default="resnet101", choices=["resnet50", "resnet101"])
    p.set_defaults(func=_convert_caffe)

    p = sub.add_parser("bench", help="our kernels side by side with PyTorch (convolution, a "
                                     "training step) and pydensecrf (CRF); needs the [test] "
                                     "extra")
    p.add_argument("what", nargs="?", choices=["conv", "aspp", "crf", "model", "all"],
                   default="all",
                   help="conv: the atrous convolution on DeepLab's layer shapes; aspp: the "
                        "ASPP head (CPU); crf: 10 dense CRF iterations; model: one training "
                        "step of whole networks; all: each of them (default)")
    p.add_argument("--models", default=None,
                   help="model: comma-separated networks (CPU: tiny, resnet50, resnet101; "
                        "default tiny,resnet50 — with --device cuda: resnet101-b10, "
                        "resnet101-b2, tiny; default the two ResNet-101 cases)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="default: all cores")
    p.add_argument("--repeat", type=positive_int, default=5, help="timed runs per block")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help="conv, aspp, model: blocks of ours then PyTorch's, in turns; the "
                        "ratio is the median of the rounds' (default: each benchmark's own, 4 "
                        "for conv, 5 for aspp and 6 for model on the CPU)")
    p.add_argument("--image", type=existing_file, default=None,
                   help="crf: the photograph to use (default: the shared example beside the "
                        "checkout, else a synthetic scene; the output says which)")
    p.set_defaults(func=_bench)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("iterations", "batch_size", "iter_size", "crop", "subset", "checkpoint_every",
                 "workers", "step_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            sys.exit(f"tinydeeplab {args.command}: --{name.replace('_', '-')} must be ≥ 1, "
                     f"got {value}")
    if args.command == "bench" and args.what == "aspp" and args.device == "cuda":
        sys.exit("tinydeeplab bench aspp: the ASPP head runs as one convolution on the CPU "
                 "only; on a GPU it is four convolutions (bench conv --device cuda)")
    if getattr(args, "device", None) == "cuda":  # before any work or any file
        from .backend import cuda_usable

        if not cuda_usable():
            sys.exit(f"tinydeeplab {args.command}: --device cuda, but no CUDA GPU is usable "
                     "here (CuPy and an NVIDIA GPU are needed: pip install 'tinydeeplab[cuda]')")
    try:
        args.func(args)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        sys.exit(f"tinydeeplab {args.command}: {e}")
    except KeyboardInterrupt as e:  # Ctrl-C: what was kept, and how to go on; no traceback
        print(f"\ntinydeeplab {args.command}: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
