"""DeepLab v2's released Caffe models (``.caffemodel``) read without Caffe or protobuf.

A ``.caffemodel`` is one protocol-buffers message, ``NetParameter``, in the protobuf *wire
format*: a sequence of fields, each a key ``field_number << 3 | wire_type`` (a varint)
followed by its value — a varint (wire type 0), 8 bytes (1), a length and that many bytes
(2: strings, nested messages, packed numbers) or 4 bytes (5: a float).  The few fields we
need, from Caffe's ``caffe.proto``:

    NetParameter       layer = 100 (LayerParameter, repeated); layers = 2 (V1LayerParameter)
    LayerParameter     name = 1, type = 2, blobs = 7 (BlobProto, repeated)
    V1LayerParameter   name = 4, blobs = 6
    BlobProto          shape = 7 (BlobShape: dim = 1, repeated int64), data = 5 (floats),
                       double_data = 8; older files: num = 1, channels = 2, height = 3, width = 4

DeepLab v2's ResNet-101 names its layers as the original MSRA ResNet: ``conv1`` with
``bn_conv1`` + ``scale_conv1``, then per block ``res4b7_branch2a`` (the 1×1 reduction),
``…2b`` (the 3×3), ``…2c`` (the 1×1 expansion), ``…branch1`` (the projection), each with its
``bn…`` (mean, variance, and a factor that divides both) and ``scale…`` (γ, β); the four ASPP
classifiers are ``fc1_voc12_c0..c3`` (``fc1_c0..c3`` in the MS-COCO model).  That network
differs from torchvision's in three ways, which ``models.ResNet(style="caffe")`` builds: the
stride of a downsampling block sits on its first 1×1 convolution, max pooling rounds up, and
every block of a dilated stage (its first included) uses the stage's dilation.  Caffe feeds
BGR images minus the mean (104.008, 116.669, 122.675); we feed RGB minus the same mean, so
``conv1``'s input channels are reversed once, here (``BGR_TO_RGB``), and nowhere else.
"""
import json
import os
import re

import numpy as np


# ---- the wire format ----------------------------------------------------------------------------
def _varint(buf, pos):
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("the message ends inside a number")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("a number longer than 10 bytes")


def fields(buf):
    """Yield (field_number, wire_type, value) of one message: value is an int (wire types 0,
    1, 5 as raw bits) or a memoryview of the bytes (wire type 2)."""
    buf = memoryview(buf)
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ValueError("the message ends inside a 64-bit field")
            value, pos = bytes(buf[pos:pos + 8]), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError(f"a field of {length} bytes runs past the end of the message")
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ValueError("the message ends inside a 32-bit field")
            value, pos = bytes(buf[pos:pos + 4]), pos + 4
        else:
            raise ValueError(f"wire type {wire} (groups or garbage) in field {number}")
        yield number, wire, value


def _packed_ints(wire, value):
    if wire == 0:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(v)
    return out


def _blob(buf):
    """A BlobProto as a float32 array of its shape."""
    dims, legacy, floats, doubles = [], {}, [], []
    for number, wire, value in fields(buf):
        if number == 7 and wire == 2:  # BlobShape
            for n, w, v in fields(value):
                if n == 1:
                    dims += _packed_ints(w, v)
        elif number in (1, 2, 3, 4) and wire == 0:
            legacy[number] = value
        elif number == 5:  # float data: packed (wire 2) or one per field (wire 5)
            floats.append(np.frombuffer(bytes(value), "<f4"))
        elif number == 8:
            doubles.append(np.frombuffer(bytes(value), "<f8"))
    data = np.concatenate(floats or doubles or [np.zeros(0, np.float32)]).astype(np.float32)
    if not dims:
        dims = [legacy.get(i, 1) for i in (1, 2, 3, 4)]
    if int(np.prod(dims)) != data.size:
        raise ValueError(f"a blob of shape {tuple(dims)} holds {data.size} numbers")
    return data.reshape(dims)


def read_caffemodel(path):
    """{layer name: [blob arrays]} of a ``.caffemodel``, layers with no blobs left out."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Caffe model {path!r} does not exist")
    with open(path, "rb") as f:
        buf = f.read()
    layers = {}
    try:
        for number, wire, value in fields(buf):
            if number not in (2, 100) or wire != 2:
                continue
            name_field, blob_field = (1, 7) if number == 100 else (4, 6)
            name, blobs = None, []
            for n, w, v in fields(value):
                if n == name_field and w == 2:
                    name = bytes(v).decode("utf-8", "replace")
                elif n == blob_field and w == 2:
                    blobs.append(_blob(v))
            if name is not None and blobs:
                layers[name] = blobs
    except ValueError as e:
        raise ValueError(f"{path!r} is not a readable .caffemodel ({e}); the file is "
                         "truncated or of another kind") from None
    if not layers:
        raise ValueError(f"{path!r} holds no Caffe layers with weights; is it a .caffemodel?")
    return layers


# ---- writing (tests, and anyone building a small net by hand) ------------------------------------
def _key(number, wire):
    return _encode_varint(number << 3 | wire)


def _encode_varint(v):
    out = bytearray()
    while True:
        byte, v = v & 0x7F, v >> 7
        out.append(byte | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _length_delimited(number, payload):
    return _key(number, 2) + _encode_varint(len(payload)) + payload


def write_caffemodel(path, layers):
    """Write {layer name: [arrays]} as a NetParameter of LayerParameters (packed floats)."""
    out = bytearray()
    for name, blobs in layers.items():
        layer = _length_delimited(1, name.encode()) + _length_delimited(2, b"Convolution")
        for a in blobs:
            a = np.asarray(a, np.float32)
            dims = b"".join(_encode_varint(d) for d in a.shape)
            blob = _length_delimited(7, _length_delimited(1, dims))
            blob += _length_delimited(5, a.astype("<f4").tobytes())
            layer += _length_delimited(7, blob)
        out += _length_delimited(100, layer)
    with open(path, "wb") as f:
        f.write(bytes(out))


# ---- DeepLab v2 names -> ours -------------------------------------------------------------------
def BGR_TO_RGB(w):
    """conv1's weights for RGB input from weights trained on BGR input."""
    return np.ascontiguousarray(w[:, ::-1])


def block_names(blocks_per_stage, numbered):
    """Caffe's name of each block, stage by stage: ``res2a, res2b, …`` or (ResNet-101's
    long stages) ``res4a, res4b1, res4b2, …``."""
    names = []
    for stage, n in enumerate(blocks_per_stage):
        prefix = f"res{stage + 2}"
        if numbered[stage]:
            names.append([prefix + "a"] + [f"{prefix}b{i}" for i in range(1, n)])
        else:
            names.append([prefix + "abcdefghijklmnopqrstuvwxyz"[i] for i in range(n)])
    return names


def _conv_bn(layers, conv, bn, scale, ours, state, used):
    """Our conv weight and batch-norm arrays from Caffe's conv, BatchNorm and Scale layers; a
    convolution bias (if any) is folded into the batch norm's mean."""
    w = layers[conv][0]
    state[f"{ours[0]}.weight"] = w
    mean, var, factor = layers[bn][:3]
    factor = float(factor.ravel()[0]) if factor.size else 1.0
    factor = 1.0 / factor if factor != 0 else 0.0
    mean, var = mean * factor, var * factor
    if len(layers[conv]) > 1:
        mean = mean - layers[conv][1]
    gamma, beta = layers[scale][:2]
    state[f"{ours[1]}.running_mean"] = mean.astype(np.float32)
    state[f"{ours[1]}.running_var"] = var.astype(np.float32)
    state[f"{ours[1]}.weight"] = gamma.astype(np.float32)
    state[f"{ours[1]}.bias"] = beta.astype(np.float32)
    state[f"{ours[1]}.num_batches_tracked"] = np.zeros((), np.int64)
    used.update((conv, bn, scale))


def deeplab_state(layers, backbone="resnet101"):
    """Our state dict (``backbone.*``, and ``head.branches.*`` where the file has the ASPP
    classifiers) from the layers of a DeepLab v2 ResNet Caffe model; returns (state, number
    of classes or None, names of the layers left unused)."""
    from .models import CONFIGS

    kind, blocks, _, _ = CONFIGS[backbone]
    if kind != "bottleneck":
        raise ValueError(f"DeepLab's Caffe models are ResNet-50/101 style; {backbone!r} is not")
    numbered = [f"res{s + 2}b1_branch2a" in layers for s in range(4)]
    needed = ["conv1", "bn_conv1", "scale_conv1"]
    state, used = {}, set()
    missing = [n for n in needed if n not in layers]
    if missing:
        raise ValueError(f"not a ResNet Caffe model: no layer {missing[0]!r}")
    _conv_bn(layers, "conv1", "bn_conv1", "scale_conv1", ("backbone.conv1", "backbone.bn1"),
             state, used)
    state["backbone.conv1.weight"] = BGR_TO_RGB(state["backbone.conv1.weight"])
    for stage, names in enumerate(block_names(blocks, numbered)):
        for i, name in enumerate(names):
            ours = f"backbone.layer{stage + 1}.{i}"
            branches = [("branch2a", "conv1", "bn1"), ("branch2b", "conv2", "bn2"),
                        ("branch2c", "conv3", "bn3")]
            if i == 0:
                branches.append(("branch1", "downsample.0", "downsample.1"))
            for suffix, conv, bn in branches:
                caffe = f"{name}_{suffix}"
                for layer in (caffe, "bn" + caffe[3:], "scale" + caffe[3:]):
                    if layer not in layers:
                        raise ValueError(f"the Caffe model has no layer {layer!r}: it is not a "
                                         f"{backbone} (or the file is damaged)")
                _conv_bn(layers, caffe, "bn" + caffe[3:], "scale" + caffe[3:],
                         (f"{ours}.{conv}", f"{ours}.{bn}"), state, used)
    num_classes = None
    heads = sorted((n for n in layers if re.fullmatch(r"fc1(_\w+)?_c\d", n)),
                   key=lambda n: int(n.rsplit("_c", 1)[1]))
    for i, name in enumerate(heads):
        w, b = layers[name][:2]
        state[f"head.branches.{i}.weight"] = w
        state[f"head.branches.{i}.bias"] = b.ravel()
        num_classes = w.shape[0]
        used.add(name)
    unused = sorted(set(layers) - used)
    return state, num_classes, unused


def convert(path, out, backbone="resnet101", log=print):
    """Convert a DeepLab v2 ``.caffemodel`` into a tinydeeplab checkpoint (``out``, .npz):
    with the ASPP classifiers, a whole network that ``eval``, ``predict`` and ``--init`` take;
    without them (an ImageNet model), a backbone that ``--pretrained`` takes.  Returns the
    configuration stored in it."""
    from . import models, nn

    state, num_classes, unused = deeplab_state(read_caffemodel(path), backbone)
    if unused:
        log(f"layers not used: {', '.join(unused[:8])}{' …' if len(unused) > 8 else ''}")
    branches = sum(k.startswith("head.") and k.endswith(".weight") for k in state)
    rates = [6, 12, 18, 24, 30, 36][:branches] or [6, 12, 18, 24]
    net = models.deeplab_v2(num_classes or 1, backbone, 8, aspp_rates=rates, style="caffe")
    if num_classes is None:  # a backbone alone, stored under backbone.* as in a whole network
        net = nn.Module()
        net.backbone = models.ResNet(backbone, 8, style="caffe")
    net.load_state_dict(state)
    config = {"num_classes": num_classes, "backbone": backbone, "output_stride": 8,
              "head": "aspp", "aspp_rates": rates, "largefov_rate": 12, "crf_layer": None,
              "style": "caffe", "source": os.path.basename(os.fspath(path))}
    models.save_checkpoint(net, out, config=json.dumps(config))
    return config
