"""benchmarks/train_twin.py: the PyTorch twin's training loop follows ours step for step, so
that its images/s and mIoU (GPU run in benchmarks/gpu_checks.sh) compare like with like."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the twin is a PyTorch model")

from tinydeeplab import data, models  # noqa: E402
from tinydeeplab.benchmarks.torch_twin import copy_twin_into  # noqa: E402
from tinydeeplab.benchmarks.train_twin import train_twin  # noqa: E402
from tinydeeplab.train import TrainConfig, train  # noqa: E402


def test_the_twin_trains_to_our_weights(tmp_path):
    """Four iterations from the same start on the same batches: every weight within 1e-4
    (relative to its largest entry) of ours; measured 2.6e-6.  Weight decay on the head's
    biases, one slip of the schedule, already moves them 4e-4."""
    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=6, n_val=1, size=72, seed=2)
    cfg = TrainConfig(root, str(tmp_path / "ours"), crop=65, batch_size=3, iterations=4,
                      lr=0.01, checkpoint_every=4, workers=1)
    ours, history = train(cfg, log=lambda s: None, progress=False)
    dataset = data.VOCSegmentation(root, "train")
    start = models.deeplab_v2(dataset.num_classes, "tiny", 8, seed=cfg.seed)
    twin, speeds = train_twin(cfg, start, dataset, log=lambda s: None)
    assert len(speeds) == 4
    theirs = copy_twin_into(twin, start).state_dict()
    mine = ours.state_dict()
    moved = 0
    initial = models.deeplab_v2(dataset.num_classes, "tiny", 8, seed=cfg.seed).state_dict()
    for name, value in mine.items():
        if name.endswith(("running_var", "num_batches_tracked")):
            continue  # PyTorch keeps the unbiased variance; the weights do not depend on it
        scale = max(np.abs(value).max(), 1e-6)
        assert np.abs(theirs[name] - value).max() / scale < 1e-4, name
        moved += not np.array_equal(value, initial[name])
    assert moved > 50  # the comparison is of trained weights, not of the starting point


def test_profile_by_kernel_accounts_for_the_step_and_restores_the_kernels():
    """bench_model.profile_by_kernel (used on the GPU by gpu_checks.sh): the families and
    "other" add up to the step, the convolutions take time, the kernels are unhooked after."""
    from tinydeeplab.benchmarks import bench_model
    from tinydeeplab.kernels import atrous_conv, batch_norm

    before = atrous_conv.conv2d_forward, batch_norm.batch_norm_backward
    _, step, _ = bench_model._step_functions("tiny", 2, 65, 2)
    total, spent = bench_model.profile_by_kernel(step, lambda: None)
    assert (atrous_conv.conv2d_forward, batch_norm.batch_norm_backward) == before
    assert sum(spent.values()) == pytest.approx(total)
    assert spent["conv forward"] > 0 and spent["conv backward"] > 0
    assert spent["batch norm forward"] > 0 and spent["max-pool"] > 0
    assert spent["bilinear"] == 0  # the benchmark's step has no resize
