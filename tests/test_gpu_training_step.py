"""A whole training step on the CUDA path against the same step on the CPU path.

Every kernel a DeepLab training step calls (convolution, batch norm + ReLU, max-pool, bilinear
resize for MSC) has a CUDA variant tested on its own; this test runs them together: the
network's forward over two scales with the max fusion, the loss with ignored pixels, the
backward and the SGD update, and compares the loss, every gradient and every
updated weight with the CPU run from the same weights.

On a GPU (CuPy sees one) it runs the "tiny" DeepLab at 2 × 3 × 49 × 49 with CuPy arrays.
Without one it runs under Numba's simulator (``backend.simulated_gpu()``: NumPy arrays take
the CUDA kernels), where every simulated CUDA thread is a Python thread: the same network
shape with narrower layers and 17 × 17 images, and reduction blocks of 4 threads.
"""
import contextlib
import types

import numpy as np
import pytest
from conftest import CUDA_MODE, to_numpy

from tinydeeplab import Tensor, backend, models
from tinydeeplab.kernels import atrous_conv, batch_norm, bilinear, max_pool
from tinydeeplab.optim import SGD
from tinydeeplab.train import param_groups, segmentation_loss

KERNEL_MODULES = (atrous_conv, batch_norm, bilinear, max_pool)
NUM_CLASSES = 3


def _training_steps(device, backbone, size, steps=1):
    """Losses, first-step gradients, final weights, velocities and batch-norm statistics
    after ``steps`` SGD steps."""
    net = models.deeplab_v2(num_classes=NUM_CLASSES, backbone=backbone, aspp_rates=(1, 2),
                            seed=3)
    net.to(device).train()
    network = models.MSC(net, scales=(0.5,)).train()
    opt = SGD(param_groups(net, types.SimpleNamespace(head_lr_mult=10.0)), lr=0.01)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (2, size, size)).astype(np.uint8)
    labels[:, :size // 3] = 255  # ignored pixels
    losses, grads = [], None
    for _ in range(steps):
        opt.zero_grad()
        loss = segmentation_loss(network(Tensor(x).to(device)), labels)
        loss.backward()
        losses.append(loss.item())
        if grads is None:
            grads = {n: to_numpy(p.grad) for n, p in net.named_parameters()}
        opt.step()
    weights = {n: to_numpy(p.data) for n, p in net.named_parameters()}
    weights.update({f"velocity/{n}": to_numpy(opt.velocity[id(p)])
                    for n, p in net.named_parameters()})
    weights.update({f"buffer/{n}": to_numpy(b) for n, b in net.named_buffers()})
    return losses, grads, weights


@pytest.fixture
def kernel_devices(monkeypatch):
    """The devices of the kernel variants every dispatch chose, in call order."""
    chosen = []
    for module in KERNEL_MODULES:
        def recording_pick(*args, _pick=module.pick, **kwargs):
            impl = _pick(*args, **kwargs)
            chosen.append(impl.device)
            return impl
        monkeypatch.setattr(module, "pick", recording_pick)
    return chosen


def _relative(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_training_step_on_the_cuda_path_matches_the_cpu_path(monkeypatch, kernel_devices):
    if CUDA_MODE == "gpu":
        backbone, size, tol = "tiny", 49, 1e-3  # cuBLAS sums in other orders
        on_cuda = contextlib.nullcontext()
    else:
        # the tiny network's layout at a quarter of its widths (stem, max-pool, four stages
        # with dilation, ASPP); blocks of 128 threads with __syncthreads cost seconds each
        # in the simulator, and the tree reduction works for any power of two
        monkeypatch.setitem(models.CONFIGS, "sim", ("basic", (1, 1, 1, 1), (4, 4, 8, 8), 4))
        from tinydeeplab.kernels import batch_norm_cuda

        monkeypatch.setattr(batch_norm_cuda, "THREADS", 4)
        backbone, size, tol = "sim", 17, 1e-5
        on_cuda = backend.simulated_gpu()
    cpu_losses, cpu_grads, cpu_weights = _training_steps("cpu", backbone, size)
    assert set(kernel_devices) == {"cpu"}
    kernel_devices.clear()
    with on_cuda:
        losses, grads, weights = _training_steps("cuda", backbone, size)
    # every kernel call went to a CUDA variant: forward and backward of each layer type
    assert set(kernel_devices) == {"cuda"}, kernel_devices
    assert len(kernel_devices) > 40
    np.testing.assert_allclose(losses, cpu_losses, rtol=tol)
    assert cpu_grads.keys() == grads.keys()
    for name in cpu_grads:
        assert _relative(grads[name], cpu_grads[name]) < tol, name
    for name in cpu_weights:
        assert _relative(weights[name], cpu_weights[name]) < tol, name


@pytest.mark.skipif(CUDA_MODE == "gpu", reason="simulated_gpu() is for machines without a GPU")
def test_simulated_gpu_reports_and_restores_the_device():
    from tinydeeplab import nn

    a = np.ones((1, 2, 3, 3), np.float32)
    assert Tensor(a).device == "cpu"
    with backend.simulated_gpu():
        t = Tensor(a)
        assert t.device == "cuda" and t.to("cuda") is t
        assert backend.to_device(a, "cuda") is a
        layer = nn.Conv2d(2, 2, 3, padding=1, rng=np.random.default_rng(0)).to("cuda")
        assert layer.weight.device == "cuda"
    assert Tensor(a).device == "cpu"


def test_simulated_gpu_needs_the_simulator(monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    with pytest.raises(RuntimeError, match="NUMBA_ENABLE_CUDASIM=1"):
        with backend.simulated_gpu():
            pass


@pytest.mark.skipif(CUDA_MODE == "gpu", reason="the GPU run of `train --device cuda` is in "
                    "benchmarks/gpu_checks.sh; simulated_gpu() is for machines without a GPU")
def test_train_device_cuda_runs_under_the_simulator(tmp_path, monkeypatch):
    """``train(device="cuda")``: data copied to the device, the step, the checkpoint copied
    back; one iteration of the narrow network gives the CPU run's checkpoint."""
    from tinydeeplab import data
    from tinydeeplab.kernels import batch_norm_cuda
    from tinydeeplab.train import TrainConfig, train

    monkeypatch.setitem(models.CONFIGS, "sim", ("basic", (1, 1, 1, 1), (4, 4, 8, 8), 4))
    monkeypatch.setattr(batch_norm_cuda, "THREADS", 4)
    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=2, n_val=1, size=24, seed=1)
    saved = {}
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(root, str(tmp_path / device), backbone="sim", aspp_rates=(1, 2),
                          crop=13, scale=None, batch_size=2, iterations=1, device=device)
        with backend.simulated_gpu() if device == "cuda" else contextlib.nullcontext():
            _, history = train(cfg, log=lambda s: None, progress=False)
        saved[device] = dict(np.load(str(tmp_path / device / "checkpoint.npz")))
        assert np.isfinite(history[0]["loss"])
    assert saved["cpu"].keys() == saved["cuda"].keys()
    for name, value in saved["cpu"].items():
        if value.dtype.kind == "f":
            assert _relative(saved["cuda"][name], value) < 1e-5, name
