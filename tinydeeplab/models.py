"""DeepLab v2: a ResNet with atrous convolution in its last stages, and the ASPP head.

DeepLab v2 §3.1-3.2 (Chen et al., TPAMI 2017).  A ResNet downsamples by 32; DeepLab removes
the stride of the last stage (output stride 16) or of the last two (output stride 8) and
dilates the convolutions after each removed stride by the factor it removed, so every layer
keeps the field of view it was trained with while the feature map stays 4× (or 2×) denser.
Atrous Spatial Pyramid Pooling then classifies each position from four parallel 3×3 atrous
convolutions with rates (6, 12, 18, 24) — four fields of view — and sums their logits.
DeepLab v1's LargeFOV head is one 3×3 convolution at rate 12 followed by two 1×1 layers.

Parameter names follow torchvision's ResNet (``layer3.0.conv2.weight`` ...), so its weights
load by name with ``load_torchvision_resnet``.
"""
import contextlib
import os
import tempfile

import numpy as np

from . import functional as F
from . import nn
from .autograd import Tensor
from .backend import to_device
from .data import MEAN_RGB
from .ops import maximum

# name -> (block, blocks per stage, stage widths, stem width)
CONFIGS = {
    "tiny": ("basic", (1, 1, 1, 1), (16, 32, 64, 128), 16),
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512), 64),
    "resnet34": ("basic", (3, 4, 6, 3), (64, 128, 256, 512), 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), (64, 128, 256, 512), 64),
}


class BasicBlock(nn.Module):
    """Two 3×3 convolutions.  In the first block of a stage whose stride became dilation both
    keep the previous dilation (as mmsegmentation's ``contract_dilation``; torchvision has no
    dilated BasicBlock).  The exact "à trous" equivalent of the strided block would give conv2
    the new dilation; on the demo's tiny network that measured 0.364 /
    0.401 val mIoU (without / with CRF) against 0.419 / 0.490 for this default, so the
    default stays.  Bottleneck blocks are exact either way (lesson 04)."""
    expansion = 1

    def __init__(self, inplanes, planes, stride, dilation, downsample, rng):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False,
                               rng=rng)
        self.bn1 = nn.BatchNorm2d(planes, relu=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False, rng=rng)
        self.bn2 = nn.BatchNorm2d(planes, relu=True)  # relu(bn2(·) + identity)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), residual=identity)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3, 1×1 expand.  A downsampling block strides its 3×3 convolution, as
    torchvision does (ResNet "v1.5"), or (``stride_in_1x1``, the original MSRA ResNet that
    DeepLab's Caffe models use) its first 1×1."""
    expansion = 4

    def __init__(self, inplanes, planes, stride, dilation, downsample, rng,
                 stride_in_1x1=False):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, s1, bias=False, rng=rng)
        self.bn1 = nn.BatchNorm2d(planes, relu=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, s3, dilation, dilation, bias=False,
                               rng=rng)
        self.bn2 = nn.BatchNorm2d(planes, relu=True)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False, rng=rng)
        self.bn3 = nn.BatchNorm2d(planes * 4, relu=True)  # relu(bn3(·) + identity)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.bn3(self.conv3(out), residual=identity)


class ResNet(nn.Module):
    """The backbone without its classifier: x (N, 3, H, W) -> features (N, C, H/os, W/os).

    ``style="torchvision"``: torchvision's ResNet with ``replace_stride_with_dilation`` (the
    first block of a dilated stage keeps the previous dilation).  ``style="caffe"``: the
    network of DeepLab's released Caffe models (``tinydeeplab.caffe``): strides on the first
    1×1 convolution, max pooling rounding up, every block of a dilated stage at its dilation.
    """

    def __init__(self, name="resnet101", output_stride=8, stem_ceil_mode=False, seed=0,
                 style="torchvision"):
        super().__init__()
        if name not in CONFIGS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(CONFIGS)}")
        if style not in ("torchvision", "caffe"):
            raise ValueError(f"style must be 'torchvision' or 'caffe', got {style!r}")
        if style == "caffe" and CONFIGS[name][0] != "bottleneck":
            raise ValueError(f"style 'caffe' is the MSRA ResNet-50/101; {name!r} has basic "
                             "blocks")
        self.style = style
        stem_ceil_mode = stem_ceil_mode or style == "caffe"
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        kind, blocks, widths, stem = CONFIGS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        rng = np.random.default_rng(seed)
        self.name, self.output_stride = name, output_stride
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False, rng=rng)
        self.bn1 = nn.BatchNorm2d(stem, relu=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=stem_ceil_mode)
        # which of stages 2-4 trade their stride for dilation
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False,) * 3}
        self._inplanes, self._dilation = stem, 1
        self.layer1 = self._stage(block, widths[0], blocks[0], 1, False, rng)
        self.layer2 = self._stage(block, widths[1], blocks[1], 2, dilate[output_stride][0], rng)
        self.layer3 = self._stage(block, widths[2], blocks[2], 2, dilate[output_stride][1], rng)
        self.layer4 = self._stage(block, widths[3], blocks[3], 2, dilate[output_stride][2], rng)
        self.out_channels = widths[3] * block.expansion
        # below one output pixel's worth of input the logits mean nothing
        self.min_input = output_stride

    def _stage(self, block, planes, blocks, stride, dilate, rng):
        previous = self._dilation
        if dilate:  # as torchvision's replace_stride_with_dilation
            self._dilation *= stride
            stride = 1
        extra = {}
        if self.style == "caffe":
            previous, extra = self._dilation, {"stride_in_1x1": True}
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * block.expansion, 1, stride, bias=False,
                          rng=rng),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self._inplanes, planes, stride, previous, downsample, rng, **extra)]
        self._inplanes = planes * block.expansion
        layers += [block(self._inplanes, planes, 1, self._dilation, None, rng)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def freeze_batch_norm(self, frozen=True):
        for _, m in self.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.freeze(frozen)
        return self


class ASPP(nn.Module):
    """Four parallel 3×3 atrous classifiers, logits summed (DeepLab v2 §3.3, Fig. 4)."""

    def __init__(self, in_channels, num_classes, rates=(6, 12, 18, 24), seed=0):
        super().__init__()
        rng = np.random.default_rng(seed + 1)
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, 1, r, r, bias=True, init_std=0.01, rng=rng)
            for r in self.rates)
        # True: the branches' sum computed as one convolution (one GEMM each way instead of
        # one per branch; ``kernels.aspp``); False: branch by branch, as written above.
        self.stacked = True

    def forward(self, x):
        branches = list(self.branches)
        if self.stacked:  # the same sum, as one convolution: kernels/aspp.py
            return F.aspp_conv2d(x, [b.weight for b in branches], [b.bias for b in branches],
                                 self.rates)
        out = branches[0](x)
        for branch in branches[1:]:
            out = out + branch(x)
        return out


class LargeFOV(nn.Module):
    """DeepLab v1's head: 3×3 at rate 12, then two 1×1 layers (fc7, fc8)."""

    def __init__(self, in_channels, num_classes, width=1024, rate=12, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed + 1)
        self.fc6 = nn.Conv2d(in_channels, width, 3, 1, rate, rate, init_std=0.01, rng=rng)
        self.fc7 = nn.Conv2d(width, width, 1, init_std=0.01, rng=rng)
        self.fc8 = nn.Conv2d(width, num_classes, 1, init_std=0.01, rng=rng)

    def forward(self, x):
        return self.fc8(F.relu(self.fc7(F.relu(self.fc6(x)))))


class DeepLabV2(nn.Module):
    """backbone → head → logits at 1/output_stride.  With a ``crf`` head (``crf.CRFLayer``),
    the logits are upsampled bilinearly to the input size and refined by mean-field inference
    on the image — end to end, not post-processing."""

    def __init__(self, backbone, head, crf=None):
        super().__init__()
        self.backbone, self.head, self.crf = backbone, head, crf
        self.unary_loss = False  # training with a CRF: also return the logits before it

    def forward(self, x, image=None):
        """x: (N, 3, H, W) mean-subtracted images.  ``image`` (N, H, W, 3) RGB 0..255 is only
        used by the CRF head; without it the CRF recovers it from x (adding the mean back)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"input must be (N, 3, H, W) images, got shape {x.shape}")
        if min(x.shape[2:]) < self.backbone.min_input:
            raise ValueError(f"input {x.shape[2]}×{x.shape[3]} is smaller than the "
                             f"{self.backbone.min_input}×{self.backbone.min_input} this "
                             f"network (output stride {self.backbone.output_stride}) accepts")
        logits = self.head(self.backbone(x))
        if self.crf is None:
            return logits
        if image is None:
            rgb = to_device(x.data, "cpu").transpose(0, 2, 3, 1) + MEAN_RGB
            image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        refined = self.crf(F.interpolate(logits, x.shape[2:]), image)
        return [logits, refined] if self.training and self.unary_loss else refined


def deeplab_v2(num_classes=21, backbone="resnet101", output_stride=8,
               aspp_rates=(6, 12, 18, 24), head="aspp", seed=0, stem_ceil_mode=False,
               crf_layer=None, largefov_rate=12, style="torchvision", largefov_width=None):
    """DeepLab v2 (``head="aspp"``, branches at ``aspp_rates``) or v1-style LargeFOV
    (``head="largefov"``, its 3×3 at ``largefov_rate``, ``largefov_width`` channels in its
    hidden layers: by default v1's 1024, or 4× the backbone's channels if fewer).  ``crf_layer``: None, or a dict of
    ``crf.CRFLayer`` arguments (e.g. {"iterations": 5}) to end the network with a trainable
    CRF.  ``style``: "torchvision" or "caffe" (see ``ResNet``)."""
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if largefov_width is not None and (int(largefov_width) != largefov_width or
                                       largefov_width < 1):
        raise ValueError(f"largefov_width must be a positive integer, got {largefov_width!r}")
    if int(largefov_rate) != largefov_rate or largefov_rate < 1:
        raise ValueError(f"largefov_rate must be a positive integer, got {largefov_rate!r}")
    if not aspp_rates or any(int(r) != r or r < 1 for r in aspp_rates):
        raise ValueError(f"aspp_rates must be positive integers, got {aspp_rates!r}")
    if head not in ("aspp", "largefov"):
        raise ValueError(f"head must be 'aspp' or 'largefov', got {head!r}")
    body = ResNet(backbone, output_stride, stem_ceil_mode, seed, style)
    if head == "aspp":
        top = ASPP(body.out_channels, num_classes, aspp_rates, seed)
    else:
        width = min(1024, 4 * body.out_channels) if largefov_width is None else largefov_width
        top = LargeFOV(body.out_channels, num_classes, int(width), rate=int(largefov_rate),
                       seed=seed)
    layer = None
    if crf_layer is not None:
        from .crf import CRFLayer

        layer = CRFLayer(**{"num_classes": num_classes, **crf_layer})
    return DeepLabV2(body, top, layer)


class MSC(nn.Module):
    """Multi-scale inputs (DeepLab v2 §3.2): run the network on the image at scales 1, 0.75,
    0.5, upsample the logits to the scale-1 size and fuse by pixel-wise max.  In training it
    returns every scale's logits and the fused ones, each to get its own loss."""

    def __init__(self, model, scales=(0.75, 0.5)):
        super().__init__()
        self.model, self.scales = model, tuple(scales)

    def forward(self, x):
        logits = self.model(x)
        H, W = x.shape[2:]
        pyramid = [self.model(F.interpolate(x, (max(1, int(H * s)), max(1, int(W * s)))))
                   for s in self.scales]
        fused = logits
        for p in pyramid:
            fused = maximum(fused, F.interpolate(p, logits.shape[2:]))
        return [logits, *pyramid, fused] if self.training else fused


# ---- weights ------------------------------------------------------------------------------------
def load_torchvision_resnet(backbone, state_dict, strict=True):
    """Load a torchvision ResNet ``state_dict`` (a dict of torch tensors or arrays, or a path
    to a .pth or .npz file) into our ResNet; its classifier (fc.*) is ignored."""
    if isinstance(backbone, DeepLabV2):
        backbone = backbone.backbone
    source = "the state dict"
    if isinstance(state_dict, (str, os.PathLike)):
        source, state_dict = repr(os.fspath(state_dict)), _read_weights(state_dict)
    state = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    try:
        return backbone.load_state_dict(state, strict=strict)
    except ValueError as e:
        raise ValueError(f"{source} does not fit a {backbone.name} backbone (torchvision "
                         f"names expected): {e}") from None


def _read_weights(path):
    """A state dict (name -> array) from a torchvision ``.pth`` (read without PyTorch, see
    ``tinydeeplab.pth``) or an ``.npz`` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if path.endswith(".npz"):
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except Exception as e:
            raise ValueError(f"weights file {path!r} is not a readable .npz file: {e}") \
                from None
    from . import pth

    return pth.state_dict(path)


def read_pretrained(path, backbone):
    """Backbone weights for ``train --pretrained``: (state dict in our ``ResNet``'s names,
    style).  ``path`` is a torchvision ResNet state dict (.pth or .npz: style
    "torchvision"), a DeepLab v2 ``.caffemodel`` (style "caffe"), or a tinydeeplab
    checkpoint (``convert-caffe``'s output among them; its backbone, in its own style)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pre-trained weights {path!r} do not exist")
    if path.endswith(".caffemodel"):
        from . import caffe

        state, _, _ = caffe.deeplab_state(caffe.read_caffemodel(path), backbone)
        return {k[9:]: v for k, v in state.items() if k.startswith("backbone.")}, "caffe"
    config = checkpoint_config(path) if path.endswith(".npz") else None
    if config is not None:
        if config["backbone"] != backbone:
            raise ValueError(f"{path!r} holds a {config['backbone']} backbone, not {backbone}")
        with np.load(path) as data:
            state = {k[15:]: data[k] for k in data.files if k.startswith("model/backbone.")}
        return state, config.get("style", "torchvision")
    state = _read_weights(path)
    return {k: v for k, v in state.items() if not k.startswith("fc.")}, "torchvision"


def checkpoint_config(path):
    """The configuration dict stored in a tinydeeplab checkpoint, or None for another .npz."""
    import json

    try:
        with np.load(os.fspath(path)) as data:
            if "extra/config" not in data.files:
                return None
            return json.loads(str(data["extra/config"]))
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist") from None
    except Exception as e:  # a truncated file: BadZipFile, EOFError, ...
        raise ValueError(f"{os.fspath(path)!r} is not a readable .npz file "
                         f"({type(e).__name__}: {e})") from None


def calibrate_batch_norm(model, x):
    """Set every batch norm's running statistics to those of the batch ``x`` (N, 3, H, W),
    layer after layer, so that in evaluation (or frozen) mode each one normalises its input
    as it would in training.  A network whose statistics were never estimated (a backbone
    built here, not pre-trained) otherwise divides by the default variance 1, and with frozen
    batch norm its activations grow through every residual block.  Returns the model."""
    from .autograd import no_grad

    norms = [m for _, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.frozen) for m in norms]
    was_training = model.training
    for m in norms:
        m.momentum, m.frozen = 1.0, False  # running statistics := this batch's
    model.train()
    try:
        with no_grad():
            model(x if isinstance(x, Tensor) else Tensor(np.asarray(x, np.float32)))
    finally:
        for m, (momentum, frozen) in zip(norms, saved):
            m.momentum = momentum
            m.freeze(frozen)
        model.train(was_training)
    return model


def save_checkpoint(model, path, **extra):
    """Write the model's state (and extra arrays) to ``path`` (.npz) atomically: a temporary
    file in the same folder, then a rename, so a crash never leaves half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist")
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    for k, v in extra.items():
        # None, dicts and ragged lists become object arrays, which np.savez pickles and
        # load_checkpoint (which never unpickles) would then reject with the whole file
        try:
            a = np.asarray(v)
        except ValueError:
            a = None
        if a is None or a.dtype.kind not in "biufcUS":
            raise TypeError(f"save_checkpoint: extra {k}={v!r:.80} is not a number, a string "
                            f"or a numeric array; store structured values as a JSON string")
        arrays[f"extra/{k}"] = a
    with atomic_write(path) as f:
        np.savez(f, **arrays)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write ``path`` atomically: yields a file open on a temporary beside it
    (``temporary_beside``), which replaces ``path`` only when the block ends without an
    error, and is removed otherwise — a crash never leaves half a file.  A missing folder, or
    a folder where the file should be, is a clear error before anything is written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder; give a file name")
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def temporary_beside(path):
    """(fd, name) of a new temporary file in ``path``'s folder for writing ``path``
    atomically (write it, then os.replace).  Its name carries our process id, so that
    ``remove_stale_temporaries`` can tell one whose writer was killed mid-write from one
    another process is writing now."""
    fd, name = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.",
                                suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    os.fchmod(fd, _file_mode())  # mkstemp makes it private (0600); the file it becomes is not
    return fd, name


def _file_mode():
    """The mode open() would give a new file now (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def remove_stale_temporaries(folder):
    """Delete the temporaries (``temporary_beside``) in ``folder`` whose writer was killed
    mid-write (its process is gone; a checkpoint's can be hundreds of MB); returns their
    names."""
    removed = []
    for name in os.listdir(folder):
        parts = name.split(".")
        if not (name.startswith(".") and name.endswith(".tmp") and len(parts) >= 5):
            continue
        try:
            pid = int(parts[-3])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)  # raises if no such process
            continue
        except ProcessLookupError:
            pass
        except PermissionError:  # alive, someone else's
            continue
        os.remove(os.path.join(folder, name))
        removed.append(name)
    return removed


def load_checkpoint(model, path, strict=True):
    """Load a checkpoint written by ``save_checkpoint``; returns its extra arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise ValueError(f"checkpoint {path!r} is not a readable .npz file: {e}") from None
    state = {k[6:]: v for k, v in arrays.items() if k.startswith("model/")}
    if not state:
        raise ValueError(f"checkpoint {path!r} holds no model weights")
    for k, v in state.items():  # a diverged run's weights would load and predict nonsense
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise ValueError(f"checkpoint {path!r} holds non-finite weights (NaN or inf) in "
                             f"{k}: the run that wrote it diverged; use an earlier checkpoint")
    try:
        model.load_state_dict(state, strict=strict)
    except ValueError as e:
        raise ValueError(f"checkpoint {path!r} does not fit this model: {e}") from None
    return {k[6:]: v for k, v in arrays.items() if k.startswith("extra/")}
