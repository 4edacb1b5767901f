"""The command line: help, train / eval / predict / crf on real VOC files, the demo at a small
size, and clear failures (non-zero exit, one-line message, nothing half-written)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tinydeeplab import data, demo
from tinydeeplab.cli import main

VOC_MINI = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "voc_mini"
needs_voc = pytest.mark.skipif(not VOC_MINI.is_dir(),
                               reason=f"{VOC_MINI} (three real VOC pairs) is not on this machine")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tinydeeplab.cli", *map(str, args)],
                          capture_output=True, text=True)


def test_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("demo", "train", "eval", "predict", "crf", "check-data", "tune-crf", "export",
                "convert-caffe", "bench"):
        assert cmd in out.stdout
        assert run_cli(cmd, "--help").returncode == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few iterations on the real VOC files."""
    if not VOC_MINI.is_dir():
        pytest.skip(f"{VOC_MINI} (three real VOC pairs) is not on this machine")
    out = tmp_path_factory.mktemp("run")
    main(["train", "--data", str(VOC_MINI), "--out", str(out), "--crop", "97",
          "--batch-size", "2", "--iterations", "3", "--checkpoint-every", "2"])
    return out


@needs_voc
def test_train_writes_checkpoint_log_and_curves(trained):
    assert {"checkpoint.npz", "log.jsonl", "curves.png"} <= set(os.listdir(trained))
    assert len(open(trained / "log.jsonl").read().splitlines()) == 3
    assert not [f for f in os.listdir(trained) if f.endswith(".tmp")]


@needs_voc
def test_eval_and_predict_on_real_files(trained, tmp_path):
    scores = tmp_path / "scores.json"
    main(["eval", "--data", str(VOC_MINI), "--checkpoint", str(trained / "checkpoint.npz"),
          "--crf", "--scales", "1,0.75", "--flip", "--json", str(scores), "--confusion",
          str(tmp_path / "confusion.png")])
    text = scores.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    result = json.loads(text)
    assert set(result) == {"plain", "crf", "settings"}
    assert len(result["plain"]["per_class_iou"]) == 21
    assert result["plain"]["per_class_iou"]["sofa"] is None  # absent from masks and predictions
    assert np.array(result["crf"]["confusion_matrix"]).shape == (21, 21)
    assert result["settings"]["flip"] is True
    with Image.open(tmp_path / "confusion.png") as im:
        assert im.size[0] > 300
    main(["predict", str(VOC_MINI / "JPEGImages"), "--checkpoint",
          str(trained / "checkpoint.npz"), "--out", str(tmp_path / "pred"), "--crf"])
    pngs = sorted((tmp_path / "pred").glob("*.png"))
    assert len(pngs) == 3
    with Image.open(pngs[0]) as im:
        assert im.mode == "P" and im.size == Image.open(
            VOC_MINI / "JPEGImages" / (pngs[0].stem + ".jpg")).size
    assert len(list((tmp_path / "pred").glob("*_overlay.jpg"))) == 3


def test_crf_command(tmp_path):
    image = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "im.png")
    probs = np.random.default_rng(1).dirichlet(np.ones(3), (20, 30)).transpose(2, 0, 1)
    np.save(tmp_path / "p.npy", probs)
    out = run_cli("crf", "--image", tmp_path / "im.png", "--probs", tmp_path / "p.npy", "--out",
                  tmp_path / "m.png", "--iterations", "2")
    assert out.returncode == 0, out.stderr
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P" and im.size == (30, 20)


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/nonexistent/voc", "--out", "{tmp}/o"], "does not exist"),
    (["eval", "--data", "{tmp}", "--checkpoint", "{tmp}/none.npz"], "does not exist"),
    (["crf", "--image", "{tmp}/bad.jpg", "--probs", "{tmp}/p.npy", "--out", "{tmp}/m.png"],
     "cannot be read"),
    (["train", "--data", "{tmp}", "--out", "{tmp}/o", "--iterations", "0"], "must be ≥ 1"),
    (["predict", "{tmp}/missing.jpg", "--checkpoint", "{tmp}/c.npz", "--out", "{tmp}/p"],
     "does not exist"),
    (["bench", "crf", "--repeat", "0"], "positive whole number"),  # before any timing starts
    (["bench", "crf", "--image", "{tmp}/missing.png"], "no such file"),
    (["bench", "model", "--models", "tiny,resnet7"], "unknown ['resnet7']"),
    (["bench", "all", "--models", "resnet7"], "unknown ['resnet7']"),  # before conv's timing
    (["bench", "conv", "--models", "tiny"], "--models is for 'bench model'"),
    (["bench", "model", "--rounds", "0"], "positive whole number"),
    (["bench", "crf", "--rounds", "3"], "--rounds is for 'bench conv'"),
    (["bench", "aspp", "--device", "cuda"], "on the CPU only"),
])
def test_bad_input_exits_non_zero_with_a_message(tmp_path, args, message):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    np.save(tmp_path / "p.npy", np.ones((2, 4, 4), np.float32) / 2)
    out = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr


def test_checkpoint_from_a_different_model_is_refused(tmp_path):
    root = data.make_synthetic_voc(str(tmp_path / "syn"), 2, 1, 48, seed=0)
    main(["train", "--data", root, "--out", str(tmp_path / "r"), "--crop", "48",
          "--batch-size", "2", "--iterations", "1"])
    ckpt = np.load(tmp_path / "r" / "checkpoint.npz")
    arrays = {k: ckpt[k] for k in ckpt.files}
    cfg = json.loads(str(arrays["extra/config"]))
    cfg["backbone"] = "resnet18"  # claims another architecture than the weights it holds
    arrays["extra/config"] = np.array(json.dumps(cfg))
    np.savez(tmp_path / "other.npz", **arrays)
    out = run_cli("eval", "--data", root, "--checkpoint", tmp_path / "other.npz")
    assert out.returncode != 0 and "does not fit this model" in out.stderr
    again = run_cli("train", "--data", root, "--out", tmp_path / "r", "--iterations", "2",
                    "--crop", "48", "--batch-size", "2")
    assert again.returncode != 0 and "--resume" in again.stderr


def _crf_inputs(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "im.png")
    np.save(tmp_path / "p.npy", np.ones((2, 4, 4), np.float32) / 2)
    return ["crf", "--image", tmp_path / "im.png", "--probs", tmp_path / "p.npy", "--out"]


def test_output_into_a_missing_folder_is_refused(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    out = run_cli(*_crf_inputs(tmp_path), tmp_path / "file" / "m.png")
    assert out.returncode != 0 and "does not exist" in out.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: a read-only folder is still "
                    "writable, so this case cannot be produced")
def test_unwritable_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    out = run_cli(*_crf_inputs(tmp_path), locked / "m.png")
    assert out.returncode != 0 and "cannot write" in out.stderr
    assert list(locked.iterdir()) == []


def test_demo_at_a_small_size(tmp_path):
    """The demo end to end, smaller (40 images of 96², 500 iterations, ~30 s): files written,
    and the scores it reaches.  Measured: val mIoU 0.270 without CRF and 0.283 with; other
    summation orders in the weight gradients gave 0.266 / 0.286 and 0.265 / 0.265 (on 10
    images of 96², DeepLab's CRF widths can go either way); predicting background
    everywhere scores about 0.15.  (The full demo: see README.)"""
    summary = demo.run(out_dir=str(tmp_path), iterations=500, n_train=40, n_val=10, size=96,
                       crop=81, progress=False, log=lambda s: None)
    for name in ("curves.png", "predictions.png", "scores.json"):
        assert (tmp_path / name).is_file()
    assert summary["miou"] >= 0.22, summary["scores"]["plain"]
    assert summary["miou_crf"] >= summary["miou"] - 0.01  # the CRF does not spoil it
    assert json.loads((tmp_path / "scores.json").read_text())["miou"] == summary["miou"]


def test_flip_averages_the_mirrored_prediction():
    """With --flip, an image and its mirror get mirrored probabilities (the prediction is
    symmetric under the flip), and without it a random network's are not."""
    from tinydeeplab import models
    from tinydeeplab.evaluate import predict_probs

    model = models.deeplab_v2(4, "tiny", seed=3)
    image = np.random.default_rng(0).integers(0, 255, (37, 51, 3), np.uint8)
    mirror = np.ascontiguousarray(image[:, ::-1])
    a = predict_probs(model, image, (1.0, 0.75), flip=True)
    b = predict_probs(model, mirror, (1.0, 0.75), flip=True)
    np.testing.assert_allclose(a, b[..., ::-1], atol=1e-5)
    plain_a = predict_probs(model, image)
    assert np.abs(plain_a - predict_probs(model, mirror)[..., ::-1]).max() > 1e-3


def test_crf_params_file_is_checked(tmp_path):
    from tinydeeplab import crf

    good = tmp_path / "crf.json"
    good.write_text(json.dumps({"crf": {"bi_w": 5, "bi_xy_std": 50, "bi_rgb_std": 4},
                                "table": []}))
    assert crf.read_params(good) == {"bi_w": 5, "bi_xy_std": 50, "bi_rgb_std": 4}
    for bad, message in [({"bi_w": "4"}, "bi_w must be a positive number"),
                         ({"bi_xy_std": 0}, "bi_xy_std must be a positive number"),
                         ({"sxy": 3}, "unknown CRF parameters"),
                         ({"iterations": 2.5}, "iterations must be an integer")]:
        good.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            crf.read_params(good)


def test_bench_hands_its_options_to_the_benchmarks(monkeypatch):
    """`tinydeeplab bench model`, `bench conv` and `bench aspp` hand their options to the run
    functions (a training-step benchmark takes minutes; tests/test_benchmarks.py runs the
    convolution one on a small shape)."""
    pytest.importorskip("torch", reason="tinydeeplab bench compares with PyTorch")
    from tinydeeplab.benchmarks import bench_model

    calls = []
    monkeypatch.setattr(bench_model, "run", lambda *a, **k: calls.append((a, k)))
    main(["bench", "model", "--models", "tiny,resnet101", "--threads", "1", "--repeat", "2",
          "--rounds", "3"])
    main(["bench", "model"])
    assert calls == [((1, 2), {"models": ("tiny", "resnet101"), "rounds": 3}),
                     ((None, 5), {"models": ("tiny", "resnet50")})]
    from tinydeeplab.benchmarks import bench_conv

    monkeypatch.setattr(bench_conv, "run", lambda **k: calls.append(k))
    main(["bench", "conv", "--rounds", "7"])
    assert calls[-1] == {"device": "cpu", "threads": None, "repeat": 5, "rounds": 7}
    from tinydeeplab.benchmarks import bench_aspp

    monkeypatch.setattr(bench_aspp, "run", lambda *a, **k: calls.append((a, k)))
    main(["bench", "aspp", "--threads", "2", "--repeat", "3", "--rounds", "4"])
    assert calls[-1] == ((2, 3), {"rounds": 4})
