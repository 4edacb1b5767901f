"""Training: overfitting a few images, resume equals an uninterrupted run, the LR policies,
label downsampling, parameter groups, evaluation with and without CRF."""
import dataclasses
import json
import os

import numpy as np
import pytest

from tinydeeplab import data, models
from tinydeeplab.evaluate import evaluate
from tinydeeplab.train import (TrainConfig, downsample_labels, learning_rate, load_model,
                               param_groups, train)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return data.make_synthetic_voc(str(tmp_path_factory.mktemp("syn")), n_train=4, n_val=2,
                                   size=64, seed=1)


def test_learning_rate_policies():
    cfg = TrainConfig("x", "y", iterations=100, lr=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(0.1)
    assert learning_rate(cfg, 50) == pytest.approx(0.1 * 0.5**0.9)
    step = TrainConfig("x", "y", lr=0.1, lr_policy="step", step_size=10, gamma=0.5)
    assert learning_rate(step, 25) == pytest.approx(0.025)
    with pytest.raises(ValueError, match="lr_policy"):
        learning_rate(TrainConfig("x", "y", lr_policy="cosine"), 0)


def test_labels_are_downsampled_by_nearest_neighbour():
    labels = np.arange(64).reshape(1, 8, 8)
    small = downsample_labels(labels, (2, 2))
    np.testing.assert_array_equal(small[0], [[18, 22], [50, 54]])  # pixel centres


def test_parameter_groups_follow_deeplab():
    net = models.deeplab_v2(3, "tiny")
    groups = param_groups(net, TrainConfig("x", "y"))
    assert [g.get("lr_mult", 1) for g in groups] == [1, 10.0, 20.0]
    assert groups[2]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(net.parameters())


def test_overfits_a_few_images(tmp_path):
    """Three 128×128 images, no scaling: training mIoU ≥ 0.9 in well under a CPU minute
    (measured 0.944 after 300 iterations, ~22 s on 2 cores)."""
    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=3, n_val=1, size=128, seed=1)
    cfg = TrainConfig(root, str(tmp_path / "run"), crop=128, scale=None, batch_size=3,
                      iterations=300, lr=0.05, checkpoint_every=1000)
    model, history = train(cfg, log=lambda s: None, progress=False)
    assert history[-1]["loss"] < history[0]["loss"] / 10
    scores = evaluate(model, data.VOCSegmentation(root, "train"))["plain"]
    assert scores["miou"] >= 0.9, scores
    lines = open(os.path.join(cfg.out_dir, "log.jsonl")).read().splitlines()
    assert len(lines) == 300 and set(json.loads(lines[0])) == {"iteration", "loss", "lr",
                                                               "images_per_s"}


def test_resume_continues_exactly(tiny_set, tmp_path, monkeypatch):
    """Kill the run right after its first checkpoint; resuming reproduces the weights of an
    uninterrupted run (same batches, same learning rates, same momentum buffers)."""
    kw = dict(crop=48, batch_size=2, lr=0.02, checkpoint_every=3, workers=2, iterations=7)
    full = TrainConfig(tiny_set, str(tmp_path / "full"), **kw)
    model_full, _ = train(full, log=lambda s: None, progress=False)

    save = models.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # the process is killed here

    monkeypatch.setattr(models, "save_checkpoint", save_then_die)
    part = TrainConfig(tiny_set, str(tmp_path / "part"), **kw)
    with pytest.raises(KeyboardInterrupt):
        train(part, log=lambda s: None, progress=False)
    monkeypatch.setattr(models, "save_checkpoint", save)
    with pytest.raises(FileExistsError, match="--resume"):
        train(part, log=lambda s: None, progress=False)
    messages = []
    model_resumed, _ = train(dataclasses.replace(part, resume=True), log=messages.append,
                             progress=False)
    assert any("resumed" in m and "iteration 3" in m for m in messages)
    a, b = model_full.state_dict(), model_resumed.state_dict()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_evaluate_with_crf_and_multiscale(tiny_set):
    net = models.deeplab_v2(5, "tiny")
    out = evaluate(net, data.VOCSegmentation(tiny_set, "val"), scales=(1.0, 0.75), crf=True,
                   crf_params={"iterations": 2})
    assert set(out) == {"plain", "crf"} and 0 <= out["crf"]["miou"] <= 1


def test_checkpoint_rebuilds_the_model(tiny_set, tmp_path):
    cfg = TrainConfig(tiny_set, str(tmp_path / "r"), crop=48, batch_size=2, iterations=2)
    model, _ = train(cfg, log=lambda s: None, progress=False)
    loaded, config = load_model(str(tmp_path / "r" / "checkpoint.npz"))
    assert config["backbone"] == "tiny" and config["num_classes"] == 5
    a, b = model.state_dict(), loaded.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope.npz"))


def test_gradient_accumulation_matches_a_bigger_batch(tiny_set, tmp_path):
    """iter_size 2 × batch 2 sees the same four crops as batch 4; with frozen batch norm the
    update is the same up to how void pixels weight each half (Caffe's iter_size semantics)."""
    start = models.deeplab_v2(5, "tiny").state_dict()
    weights = str(tmp_path / "backbone.npz")  # frozen batch norm needs given statistics
    np.savez(weights, **models.deeplab_v2(5, "tiny").backbone.state_dict())

    def update(name, **kw):
        cfg = TrainConfig(tiny_set, str(tmp_path / name), crop=48, iterations=1, lr=0.05,
                          freeze_bn=True, scale=None, pretrained=weights, **kw)
        model, history = train(cfg, log=lambda s: None, progress=False)
        return model.state_dict(), history[0]["loss"]

    big, loss_big = update("big", batch_size=4)
    acc, loss_acc = update("acc", batch_size=2, iter_size=2)
    assert loss_acc == pytest.approx(loss_big, rel=0.05)
    for k in start:
        if k.endswith("weight") and "bn" not in k:
            d_big, d_acc = big[k] - start[k], acc[k] - start[k]
            assert np.linalg.norm(d_acc - d_big) <= 0.1 * np.linalg.norm(d_big), k


def test_augmented_set_layout(tmp_path):
    root = data.make_synthetic_voc(str(tmp_path / "v"), 3, 1, 32, seed=0)
    os.rename(os.path.join(root, "SegmentationClass"), os.path.join(root, "SegmentationClassAug"))
    os.makedirs(os.path.join(root, "ImageSets", "SegmentationAug"))
    with open(os.path.join(root, "ImageSets", "SegmentationAug", "train_aug.txt"), "w") as f:
        f.write("syn_train_00000\nsyn_train_00002\n")
    ds = data.VOCSegmentation(root, "train_aug")
    assert len(ds) == 2 and ds[1][1].shape == (32, 32)
    assert len(data.VOCSegmentation(root, "train_aug", subset=1)) == 1


def test_frozen_batch_norm_without_trained_statistics_is_refused(tiny_set, tmp_path):
    """Frozen, never-estimated batch norm leaves a deep ResNet unnormalised (ResNet-101:
    loss ~1e7 at the first iteration, NaN at the second); the run is refused before it
    starts, saying what to give."""
    cfg = TrainConfig(tiny_set, str(tmp_path / "r"), crop=48, iterations=1, freeze_bn=True)
    with pytest.raises(ValueError, match="--freeze-bn needs.*--pretrained.*--init"):
        train(cfg, log=lambda s: None, progress=False)
    assert not os.path.exists(tmp_path / "r" / "checkpoint.npz")
    cfg = TrainConfig(tiny_set, str(tmp_path / "r"), crop=48, iterations=1,
                      init="a.npz", pretrained="b.pth")
    with pytest.raises(ValueError, match="either --init .* or --pretrained"):
        train(cfg, log=lambda s: None, progress=False)


def test_msc_training_adds_a_loss_per_scale_and_the_fusion(tiny_set, tmp_path):
    """--msc: the first loss is the sum of four cross-entropies (scales 1, 0.75, 0.5 and their
    max) on the same batch and start, so about four times the single-scale one; the checkpoint
    holds the plain network and records the scales."""
    def first(name, **kw):
        cfg = TrainConfig(tiny_set, str(tmp_path / name), crop=49, batch_size=2, iterations=1,
                          scale=None, **kw)
        model, history = train(cfg, log=lambda s: None, progress=False)
        return model, history[0]["loss"]

    _, single = first("single")
    model, multi = first("msc", msc=(0.75, 0.5))
    assert 3.0 * single < multi < 5.0 * single
    loaded, _ = load_model(str(tmp_path / "msc" / "checkpoint.npz"))
    assert set(loaded.state_dict()) == set(model.state_dict())
    with np.load(str(tmp_path / "msc" / "checkpoint.npz")) as f:
        assert '"msc": [0.75, 0.5]' in str(f["extra/run"])
    for bad in ((1.5,), (0.0,), ("half",)):
        with pytest.raises(ValueError, match="msc must be input scales"):
            train(TrainConfig(tiny_set, str(tmp_path / "bad"), msc=bad), log=lambda s: None,
                  progress=False)
    with pytest.raises(ValueError, match="--msc with --crf-layer"):
        train(TrainConfig(tiny_set, str(tmp_path / "bad"), msc=(0.5,), crf_layer=2),
              log=lambda s: None, progress=False)
