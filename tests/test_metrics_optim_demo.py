"""Confusion-matrix scores, the SGD update, the toy demo and the command line."""
import subprocess
import sys

import numpy as np
import pytest

from tinydeeplab import Tensor
from tinydeeplab import toy as demo
from tinydeeplab.cli import main
from tinydeeplab.metrics import ConfusionMatrix
from tinydeeplab.optim import SGD


def test_scores_by_hand():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 1]])
    s = ConfusionMatrix(3).update(pred, target).scores()
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 3, gt 3, pred 4 -> 3/4; class 2: 1/2
    assert s["per_class_iou"] == pytest.approx({"0": 1 / 3, "1": 3 / 4, "2": 1 / 2})
    assert s["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert s["pixel_acc"] == pytest.approx(5 / 7)
    assert s["mean_acc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert s["fwiou"] == pytest.approx(2 / 7 * 1 / 3 + 3 / 7 * 3 / 4 + 2 / 7 * 1 / 2)


def test_absent_classes_do_not_count_and_bad_labels_are_named():
    cm = ConfusionMatrix(4).update(np.array([0, 1]), np.array([0, 1]))
    assert cm.scores()["miou"] == 1.0 and np.isnan(cm.scores()["per_class_iou"]["3"])
    with pytest.raises(ValueError, match="outside 0..3"):
        cm.update(np.array([0, 9]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.array([0, 1, 2]), np.array([0, 1]))


def test_sgd_matches_the_caffe_update():
    p = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    v = np.zeros(2)
    theta = p.data.copy()
    for _ in range(3):
        (p * p).sum().backward()
        g = 2 * theta
        v = 0.9 * v + 0.1 * (g + 0.01 * theta)
        theta = theta - v
        opt.step()
        opt.zero_grad()
        np.testing.assert_allclose(p.data, theta)


def test_sgd_param_groups_scale_the_learning_rate():
    a = Tensor(np.array([1.0]), requires_grad=True)
    b = Tensor(np.array([1.0]), requires_grad=True)
    opt = SGD([{"params": [a]}, {"params": [b], "lr_mult": 10, "weight_decay": 0}], lr=0.01,
              momentum=0, weight_decay=0)
    (a + b).sum().backward()
    opt.step()
    np.testing.assert_allclose([a.data[0], b.data[0]], [0.99, 0.9])


def test_toy_data_is_reproducible_with_void_borders():
    x1, y1 = demo.make_toy_batch(4, seed=3)
    x2, y2 = demo.make_toy_batch(4, seed=3)
    np.testing.assert_array_equal(x1, x2)
    assert set(np.unique(y1)) <= {0, 1, 2, 255} and (y1 == 255).any()


def test_demo_learns_the_toy_task():
    """A short run must lift val mIoU far above the untrained network (guards the demo)."""
    result = demo.run(iterations=200, log=lambda line: None)
    assert result["before"]["miou"] < 0.3
    assert result["after"]["miou"] > 0.75, result["after"]


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--iterations", "0"])
    assert "iterations" in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "tinydeeplab.cli", "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("tinydeeplab ")
