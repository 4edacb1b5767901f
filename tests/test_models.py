"""ResNet + ASPP / LargeFOV against a PyTorch ResNet with torchvision's parameter names:
equal logits in eval mode, equal gradients for a training step, shapes, weights I/O, errors."""
import numpy as np
import pytest

import tinydeeplab.functional as F
from helpers import torch
from tinydeeplab import Tensor, models, nn, no_grad
from tinydeeplab.benchmarks.torch_twin import paired


def relative_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("output_stride", [8, 16])
def test_resnet50_deeplab_logits_equal_pytorch_in_eval_mode(output_stride):
    ours, body, twin = paired("resnet50", output_stride)
    x = np.random.default_rng(1).standard_normal((1, 3, 67, 75)).astype(np.float32)
    ours.eval()
    body.eval()
    with no_grad():
        y = ours(Tensor(x)).numpy()
    with torch.no_grad():
        yt = twin(torch.tensor(x)).numpy()
    assert y.shape == yt.shape == (1, 5, 9 if output_stride == 8 else 5,
                                   10 if output_stride == 8 else 5)
    assert relative_error(y, yt) <= 1e-4


def test_tiny_model_training_step_gradients_equal_pytorch():
    ours, body, twin = paired("tiny", 8, num_classes=4, seed=3)
    ours.train()
    body.train()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 49, 41)).astype(np.float32)
    y = ours(Tensor(x))
    target = rng.integers(0, 4, y.shape[:1] + y.shape[2:])
    target[0, :2] = 255
    F.cross_entropy(y, target).backward()
    yt = twin(torch.tensor(x))
    torch.nn.functional.cross_entropy(yt, torch.tensor(target), ignore_index=255).backward()
    np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-4, atol=1e-5)
    theirs = dict(body.named_parameters())
    for name, p in ours.backbone.named_parameters():
        g_ref = theirs[name].grad.numpy()
        assert relative_error(p.grad, g_ref) <= 1e-4, name
    ours_state, their_state = ours.backbone.state_dict(), body.state_dict()
    for name in ours_state:  # running statistics moved the same way
        if "running" in name:
            np.testing.assert_allclose(ours_state[name], their_state[name].numpy(), rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("name", ["tiny", "resnet50"])
def test_fused_block_ends_give_the_separate_operations_bits(name, monkeypatch):
    # nn.FUSE_BN_RELU runs batch norm, the residual addition and the ReLU as one operation;
    # a training step must come out bit for bit as with the operations one by one
    results = []
    for fuse in (True, False):
        monkeypatch.setattr(nn, "FUSE_BN_RELU", fuse)
        ours, _, _ = paired(name, 8, num_classes=5, seed=1)
        ours.train()
        rng = np.random.default_rng(4)
        x = rng.standard_normal((2, 3, 41, 49)).astype(np.float32)
        y = ours(Tensor(x))
        F.cross_entropy(y, rng.integers(0, 5, y.shape[:1] + y.shape[2:])).backward()
        results.append([y.data] + [p.grad for _, p in ours.named_parameters()] +
                       [b for _, b in ours.named_buffers()])
    fused, separate = results
    assert len(fused) == len(separate) > 50
    for a, b in zip(fused, separate):
        assert np.array_equal(a, b)


def test_output_shapes_321_gives_41_at_stride_8():
    net = models.deeplab_v2(21, "tiny", 8).eval()
    with no_grad():
        assert net(Tensor(np.zeros((1, 3, 321, 321), np.float32))).shape == (1, 21, 41, 41)
    net16 = models.deeplab_v2(21, "tiny", 16).eval()
    with no_grad():
        assert net16(Tensor(np.zeros((1, 3, 321, 321), np.float32))).shape == (1, 21, 21, 21)


def test_largefov_head_and_msc():
    net = models.deeplab_v2(3, "tiny", 8, head="largefov")
    msc = models.MSC(net)
    x = Tensor(np.random.default_rng(0).standard_normal((1, 3, 64, 48)).astype(np.float32))
    outs = msc.train()(x)
    assert len(outs) == 4 and outs[0].shape == outs[-1].shape == (1, 3, 8, 6)
    loss = sum(F.cross_entropy(o, np.zeros((1,) + o.shape[2:], np.int64)) for o in outs)
    loss.backward()
    assert all(p.grad is not None for p in net.head.parameters())
    with no_grad():
        fused = msc.eval()(x)
    assert fused.shape == (1, 3, 8, 6)


def test_frozen_batch_norm_keeps_statistics_and_affine():
    net = models.deeplab_v2(3, "tiny", 8)
    net.backbone.freeze_batch_norm()
    before = net.backbone.state_dict()
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 33, 33)).astype(np.float32))
    F.cross_entropy(net.train()(x), np.zeros((2, 5, 5), np.int64)).backward()
    after = net.backbone.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before if "bn" in k)
    assert net.backbone.bn1.weight.grad is None and net.backbone.conv1.weight.grad is not None


def test_checkpoint_round_trip_and_errors(tmp_path):
    net = models.deeplab_v2(3, "tiny", 8, seed=1)
    path = tmp_path / "ckpt.npz"
    models.save_checkpoint(net, path, iteration=7)
    other = models.deeplab_v2(3, "tiny", 8, seed=2)
    extra = models.load_checkpoint(other, path)
    assert int(extra["iteration"]) == 7
    a, b = net.state_dict(), other.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]  # no temporary left behind
    with pytest.raises(ValueError, match="does not fit this model.*mis-shaped"):
        models.load_checkpoint(models.deeplab_v2(5, "tiny", 8), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_checkpoint(net, tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        models.load_checkpoint(net, tmp_path / "bad.npz")


def test_torchvision_loader_names_missing_and_misshaped_keys(tmp_path):
    net = models.deeplab_v2(3, "tiny", 8)
    state = net.backbone.state_dict()
    state.pop("layer1.0.conv1.weight")
    state["conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"conv1.weight: expected \(16, 3, 7, 7\)"):
        models.load_torchvision_resnet(net, state)
    state["conv1.weight"] = net.backbone.conv1.weight.data
    with pytest.raises(ValueError, match=r"1 missing keys: layer1.0.conv1.weight"):
        models.load_torchvision_resnet(net, state)
    np.savez(tmp_path / "w.npz", **net.backbone.state_dict())
    models.load_torchvision_resnet(net, tmp_path / "w.npz")


def test_bad_inputs_give_clear_errors():
    net = models.deeplab_v2(3, "tiny", 8)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net(Tensor(np.zeros((1, 4, 64, 64), np.float32)))
    with pytest.raises(ValueError, match="smaller than"):
        net(Tensor(np.zeros((1, 3, 5, 64), np.float32)))
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'"):
        models.deeplab_v2(3, "resnet7")
    with pytest.raises(ValueError, match="output_stride"):
        models.deeplab_v2(3, "tiny", 4)


def test_module_state_dict_and_modes():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    names = list(seq.state_dict())
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                     "1.running_var", "1.num_batches_tracked"]
    assert not seq.eval()[1].training and seq.train()[1].training
    assert len(seq.parameters()) == 4


def test_largefov_width_sets_its_hidden_channels_and_is_checked():
    net = models.deeplab_v2(5, "tiny", 8, head="largefov", largefov_rate=4, largefov_width=20)
    assert net.head.fc6.weight.shape == (20, 128, 3, 3) and net.head.fc8.weight.shape == (5, 20, 1, 1)
    assert models.deeplab_v2(5, "tiny", 8, head="largefov").head.fc6.weight.shape[0] == 512
    with pytest.raises(ValueError, match="largefov_width"):
        models.deeplab_v2(5, "tiny", 8, head="largefov", largefov_width=0)
