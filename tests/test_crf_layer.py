"""The CRF as a trainable layer: its forward equals dense_crf, gradcheck through the whole
layer (logits and compatibilities, Potts and full matrix), the CUDA version under the
simulator equals the CPU one, the model and the training command with --crf-layer, bad input."""
import json
import os

import numpy as np
import pytest
from conftest import CUDA_MODE, on_device, to_numpy

from tinydeeplab import crf, data, models
from tinydeeplab.autograd import Tensor
from tinydeeplab.cli import main
from tinydeeplab.gradcheck import gradcheck
from tinydeeplab.train import load_model


def softmax(a, axis=1):
    e = np.exp(a - a.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def scene(B, C, H, W, seed=0):
    """Images of two flat colours with noise, and noisy logits that roughly follow them."""
    rng = np.random.default_rng(seed)
    images = np.empty((B, H, W, 3), np.uint8)
    logits = rng.normal(size=(B, C, H, W))
    for b in range(B):
        split = rng.integers(2, W - 2)
        images[b] = rng.integers(0, 40, (H, W, 3))
        images[b, :, split:] += np.uint8(150)
        logits[b, 1 % C, :, split:] += 1.0
    return images, logits


@pytest.mark.parametrize("shape", [(2, 4, 9, 11), (1, 21, 13, 7)])
def test_forward_equals_dense_crf(shape):
    images, logits = scene(*shape)
    layer = crf.CRFLayer(iterations=5)  # DeepLab's parameters
    out = layer(Tensor(logits.astype(np.float32)), images).numpy()
    for b in range(shape[0]):
        ref = crf.dense_crf(images[b], softmax(logits[b], 0).astype(np.float32), iterations=5)
        q = softmax(out[b], 0)
        assert np.abs(q - ref).max() < 1e-5
        assert (q.argmax(0) == ref.argmax(0)).all()


@pytest.mark.parametrize("compat", ["potts", "matrix"])
def test_gradcheck_through_the_layer(compat):
    """Finite differences on float64 logits and both weights: the backward uses the reversed
    filter as the transpose of the lattice filter; symmetric normalisation is a constant."""
    images, logits = scene(2, 3, 7, 9, seed=1)
    layer = crf.CRFLayer(iterations=3, compat=compat, num_classes=3, bi_xy_std=4,
                         bi_rgb_std=20)
    rng = np.random.default_rng(2)
    x = Tensor(logits, requires_grad=True)
    pos = Tensor(layer.pos_w.data.astype(np.float64) + rng.normal(0, 0.3, layer.pos_w.shape),
                 requires_grad=True)
    bi = Tensor(layer.bi_w.data.astype(np.float64) + rng.normal(0, 0.3, layer.bi_w.shape),
                requires_grad=True)

    def fn(x, pos, bi):
        layer.pos_w, layer.bi_w = pos, bi
        return layer(x, images)

    assert gradcheck(fn, [x, pos, bi])


def test_gradcheck_catches_a_forward_filter_in_the_backward(monkeypatch):
    """The check above can fail: the forward filter in place of its transpose is caught."""
    images, logits = scene(1, 3, 7, 9, seed=3)
    apply = crf._Kernel.apply
    monkeypatch.setattr(crf._Kernel, "apply",
                        lambda self, x, reverse=False, scale=None, out=None:
                        apply(self, x, False, scale, out))
    layer = crf.CRFLayer(iterations=2, bi_xy_std=4, bi_rgb_std=20)
    x = Tensor(logits, requires_grad=True)
    assert not gradcheck(lambda x: layer(x, images), [x], raise_exception=False)


def test_cuda_layer_equals_cpu():
    images, logits = scene(2, 3, 6, 7, seed=4)
    weights = np.cos(np.arange(2 * 3 * 6 * 7)).reshape(2, 3, 6, 7).astype(np.float32)
    results = []
    for device in ("cpu", "cuda"):
        layer = crf.CRFLayer(iterations=3, device=device)
        if device == "cuda" and CUDA_MODE == "gpu":
            layer.to("cuda")
        x = Tensor(on_device(logits.astype(np.float32), device), requires_grad=True)
        y = layer(x, images)
        (y * Tensor(on_device(weights, device))).sum().backward()
        results.append([to_numpy(a) for a in (y.data, x.grad, layer.pos_w.grad,
                                              layer.bi_w.grad)])
    for cpu, cuda in zip(*results):
        np.testing.assert_allclose(cuda, cpu, rtol=1e-4, atol=2e-5)


def test_model_with_crf_head_outputs_full_resolution_and_equals_post_processing():
    images, _ = scene(1, 3, 33, 41, seed=5)
    plain = models.deeplab_v2(3, "tiny", 8)
    with_crf = models.deeplab_v2(3, "tiny", 8, crf_layer={"iterations": 4})
    with_crf.load_state_dict(plain.state_dict(), strict=False)
    x = Tensor(data.to_input(images[0])[None])
    out = with_crf.eval()(x).numpy()
    assert out.shape == (1, 3, 33, 41)
    from tinydeeplab import functional as F
    probs = F.softmax(F.interpolate(plain.eval()(x), (33, 41)), axis=1).numpy()[0]
    ref = crf.dense_crf(images[0], probs, iterations=4)
    assert np.abs(softmax(out[0], 0) - ref).max() < 1e-5


def test_train_with_crf_layer_from_the_command_line(tmp_path):
    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=4, n_val=2, size=64, seed=1)
    base = tmp_path / "base"
    main(["train", "--data", root, "--out", str(base), "--crop", "49", "--iterations", "2",
          "--batch-size", "2", "--workers", "1"])
    ft = tmp_path / "ft"
    main(["train", "--data", root, "--out", str(ft), "--crop", "49", "--iterations", "3",
          "--batch-size", "2", "--workers", "1", "--init", str(base / "checkpoint.npz"),
          "--crf-layer", "2", "--crf-lr-mult", "10", "--crf-compat", "matrix",
          "--crf-unary-loss", "--crf-scale", "--crf-test-iterations", "3"])
    model, config = load_model(str(ft / "checkpoint.npz"))
    assert config["crf_layer"] == {"iterations": 2, "test_iterations": 3, "compat": "matrix",
                                   "learn_scale": True}
    assert model.crf is not None and model.crf.pos_w.shape == (5, 5)
    assert not np.allclose(model.crf.pos_w.data, 3 * np.eye(5))  # the weights were trained
    assert float(model.crf.scale.data) != 1.0
    lines = open(ft / "log.jsonl").read().splitlines()
    assert len(lines) == 3 and np.isfinite(json.loads(lines[-1])["loss"])
    main(["eval", "--data", root, "--checkpoint", str(ft / "checkpoint.npz"), "--json",
          str(tmp_path / "scores.json")])
    assert 0 <= json.load(open(tmp_path / "scores.json"))["plain"]["miou"] <= 1


def test_init_checkpoint_of_another_model_is_refused(tmp_path):
    other = models.deeplab_v2(3, "tiny", 8, head="largefov")
    models.save_checkpoint(other, str(tmp_path / "other.npz"))
    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=2, n_val=1, size=64, seed=1)
    with pytest.raises(SystemExit, match="does not fit this model"):
        main(["train", "--data", root, "--out", str(tmp_path / "run"), "--crop", "49",
              "--iterations", "1", "--init", str(tmp_path / "other.npz"), "--crf-layer", "2"])
    assert not os.path.exists(tmp_path / "run" / "checkpoint.npz")


@pytest.mark.parametrize("kwargs, call, message", [
    ({"iterations": 0}, None, "iterations must be a positive integer"),
    ({"compat": "full"}, None, "compat must be 'potts' or 'matrix'"),
    ({"compat": "matrix"}, None, "needs num_classes"),
    ({"bi_rgb_std": 0}, None, "bi_rgb_std must be positive"),
    ({}, ((1, 3, 5, 6), (1, 6, 5, 3)), r"images must be \(B, H, W, 3\)"),
    ({}, ((1, 3, 5, 6), (2, 5, 6, 3)), r"images must be \(B, H, W, 3\)"),
    ({"compat": "matrix", "num_classes": 4}, ((1, 3, 5, 6), (1, 5, 6, 3)), "for 4 labels"),
])
def test_bad_input(kwargs, call, message):
    with pytest.raises(ValueError, match=message):
        layer = crf.CRFLayer(**kwargs)
        logits_shape, image_shape = call
        layer(Tensor(np.zeros(logits_shape, np.float32)), np.zeros(image_shape, np.uint8))


def test_images_outside_0_255_are_refused():
    layer = crf.CRFLayer()
    with pytest.raises(ValueError, match="0..255"):
        layer(Tensor(np.zeros((1, 2, 4, 4), np.float32)), np.full((1, 4, 4, 3), 300.0))


@pytest.mark.parametrize("reverse", [False, True])
def test_float64_filter_cuda_equals_cpu(reverse):
    """The float64 path the gradchecks use, on both devices (CUDA: simulator without a GPU).

    The simulator runs the lattice build's float32 arithmetic exactly as the CPU, so the two
    agree to float64 rounding.  On a GPU the CUDA compiler fuses multiply-adds in the build
    (NVVM's default), so the barycentric weights can differ from the CPU's in their last
    float32 bits: the float64 results then agree to that, ~1e-7 relative."""
    rng = np.random.default_rng(6)
    f = (rng.random((40, 5)) * 3).astype(np.float32)
    v = rng.standard_normal((40, 3))
    cpu = crf.PermutohedralLattice(f, "cpu").filter(v, reverse)
    cuda = crf.PermutohedralLattice(on_device(f, "cuda"), "cuda").filter(on_device(v, "cuda"),
                                                                         reverse)
    assert cpu.dtype == np.float64 and to_numpy(cuda).dtype == np.float64
    tol = 1e-12 if CUDA_MODE == "simulator" else 1e-6
    np.testing.assert_allclose(to_numpy(cuda), cpu, rtol=tol, atol=tol)
