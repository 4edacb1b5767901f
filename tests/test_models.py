"""ResNet + ASPP / LargeFOV against a PyTorch ResNet with torchvision's parameter names:
equal logits in eval mode, equal gradients for a training step, shapes, weights I/O, errors."""
import numpy as np
import pytest

import tinydeeplab.functional as F
from helpers import torch
from tinydeeplab import Tensor, models, nn, no_grad

tnn = torch.nn


class TorchBasic(tnn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, dilation, downsample):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + idt)


class TorchBottleneck(tnn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, dilation, downsample):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + idt)


class TorchResNet(tnn.Module):
    """torchvision's ResNet layout and names (replace_stride_with_dilation), without
    torchvision."""

    def __init__(self, name, output_stride):
        super().__init__()
        kind, blocks, widths, stem = models.CONFIGS[name]
        block = TorchBasic if kind == "basic" else TorchBottleneck
        dilate = {8: (False, True, True), 16: (False, False, True)}[output_stride]
        self.inplanes, self.dilation = stem, 1
        self.conv1 = tnn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(stem)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, widths[0], blocks[0], 1, False)
        self.layer2 = self._stage(block, widths[1], blocks[1], 2, dilate[0])
        self.layer3 = self._stage(block, widths[2], blocks[2], 2, dilate[1])
        self.layer4 = self._stage(block, widths[3], blocks[3], 2, dilate[2])
        self.fc = tnn.Linear(widths[3] * block.expansion, 1000)  # ignored by the loader

    def _stage(self, block, planes, n, stride, dilate):
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = tnn.Sequential(tnn.Conv2d(self.inplanes, planes * block.expansion, 1, stride,
                                             bias=False), tnn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, previous, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, self.dilation, None) for _ in range(1, n)]
        return tnn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def randomise_batch_norm(module, seed):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, tnn.BatchNorm2d):
            C = m.num_features
            m.running_mean.copy_(torch.randn(C, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(C, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(C, generator=g) * 0.1)


def paired(name, output_stride, num_classes=5, seed=0):
    """Our DeepLab v2 and a PyTorch twin with the same weights."""
    torch.manual_seed(seed)
    body = TorchResNet(name, output_stride)
    randomise_batch_norm(body, seed)
    ours = models.deeplab_v2(num_classes, name, output_stride)
    models.load_torchvision_resnet(ours.backbone, body.state_dict())
    heads = tnn.ModuleList(tnn.Conv2d(ours.backbone.out_channels, num_classes, 3, 1, r, r)
                           for r in ours.head.rates)
    for mine, theirs in zip(ours.head.branches, heads):
        theirs.weight.data.copy_(torch.tensor(mine.weight.data))
        theirs.bias.data.copy_(torch.tensor(mine.bias.data) + 0.01)
        mine.bias.data += np.float32(0.01)

    def twin(x):
        f = body(x)
        return sum(h(f) for h in heads)

    return ours, body, twin


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
    with pytest.raises(ValueError, match=r"missing keys: \['layer1.0.conv1.weight'\]"):
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
