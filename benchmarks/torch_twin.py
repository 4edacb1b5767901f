"""A PyTorch twin of our DeepLab v2, for side-by-side checks (tests) and timing (benchmarks).

``TorchResNet`` has torchvision's ResNet layout and parameter names (including
``replace_stride_with_dilation``) without needing torchvision; ``paired`` builds our model and
this twin with identical weights.  Needs PyTorch.
"""
import numpy as np
import torch

from tinydeeplab import models

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


class TorchDeepLab(tnn.Module):
    """The twin's whole network: the ResNet body and the ASPP branches, summed."""

    def __init__(self, body, heads):
        super().__init__()
        self.body, self.heads = body, heads

    def forward(self, x):
        f = self.body(x)
        return sum(h(f) for h in self.heads)


def paired(name, output_stride, num_classes=5, seed=0):
    """Our DeepLab v2, the twin's body and the whole twin (a module), with the same weights."""
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
    return ours, body, TorchDeepLab(body, heads)


def twin_of(model):
    """A PyTorch twin (on the CPU) holding our ``model``'s weights (ASPP head): the way back
    of ``paired``, for a twin that starts where one of our runs starts."""
    state = model.state_dict()
    body = TorchResNet(model.backbone.name, model.backbone.output_stride)
    missing, unexpected = body.load_state_dict(
        {k[len("backbone."):]: torch.tensor(v) for k, v in state.items()
         if k.startswith("backbone.")}, strict=False)
    assert set(missing) <= {"fc.weight", "fc.bias"} and not unexpected, (missing, unexpected)
    classes = model.head.branches[0].weight.shape[0]
    heads = tnn.ModuleList(
        tnn.Conv2d(model.backbone.out_channels, classes, 3, 1, r, r)
        for r in model.head.rates)
    heads.load_state_dict({k[len("head.branches."):]: torch.tensor(v) for k, v in state.items()
                           if k.startswith("head.branches.")})
    return TorchDeepLab(body, heads)


def copy_twin_into(twin, model):
    """The twin's weights and batch-norm statistics into our ``model`` (on the CPU), e.g. to
    score a trained twin with our evaluation; returns ``model``."""
    state = {f"backbone.{k}": v.detach().cpu().numpy() for k, v in twin.body.state_dict().items()
             if not k.startswith("fc.")}
    state.update({f"head.branches.{k}": v.detach().cpu().numpy()
                  for k, v in twin.heads.state_dict().items()})
    model.load_state_dict(state)
    return model
