"""tune-crf: the coarse-to-fine search over (w1, θα, θβ) never returns worse than DeepLab's
defaults on the tuning images, scores in parallel processes the same as in one, and writes
parameters that eval and predict read."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tinydeeplab import crf, data, models, tune


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    data.make_synthetic_voc(str(root), n_train=4, n_val=6, size=40, seed=1)
    return str(root)


def test_search_is_never_worse_than_the_defaults(small_set):
    ds = data.VOCSegmentation(small_set, "val")
    model = models.deeplab_v2(ds.num_classes, "tiny", seed=0)
    result = tune.search(model, ds, subset=4, holdout=2, workers=2, log=lambda s: None)
    assert result["best_miou"] >= result["default"]["miou"]
    assert result["table"][0]["miou"] == result["best_miou"]
    assert [r["miou"] for r in result["table"]] == sorted(
        (r["miou"] for r in result["table"]), reverse=True)
    assert len(result["table"]) >= 28  # the coarse grid and the defaults, then the fine grid
    assert result["crf"]["pos_w"] == 3 and result["crf"]["pos_xy_std"] == 1  # fixed
    assert result["holdout"]["images"] == 2


def test_parallel_scoring_equals_serial(small_set):
    ds = data.VOCSegmentation(small_set, "val")
    model = models.deeplab_v2(ds.num_classes, "tiny", seed=0)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        paths = tune.cache_probabilities(model, ds, range(3), folder)
        candidates = [{**tune.DEFAULTS, "bi_w": w, "iterations": 3} for w in (1, 4, 9)]
        serial = tune.score_candidates(paths, candidates, ds.num_classes, workers=1)
        parallel = tune.score_candidates(paths, candidates, ds.num_classes, workers=2)
    assert serial == parallel


def test_tune_crf_command_writes_parameters_eval_reads(small_set, tmp_path):
    from tinydeeplab.train import TrainConfig, train

    cfg = TrainConfig(small_set, str(tmp_path / "run"), crop=33, iterations=2, batch_size=2)
    train(cfg, log=lambda s: None, progress=False)
    ckpt = str(tmp_path / "run" / "checkpoint.npz")
    out = tmp_path / "crf.json"
    cmd = [sys.executable, "-m", "tinydeeplab.cli", "tune-crf", "--data", small_set,
           "--checkpoint", ckpt, "--subset", "3", "--out", str(out), "--workers", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "DeepLab's defaults" in run.stdout
    result = json.loads(out.read_text())
    params = crf.read_params(out)
    assert params == result["crf"]
    run = subprocess.run([sys.executable, "-m", "tinydeeplab.cli", "eval", "--data", small_set,
                          "--checkpoint", ckpt, "--crf-params", str(out), "--subset", "3"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "crf" in run.stdout.splitlines()[0]
