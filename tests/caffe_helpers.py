"""A DeepLab v2 Caffe model with random weights, in Caffe's names and blob layouts."""
import numpy as np

from tinydeeplab import caffe, models


def deeplab_caffe_layers(rng, num_classes=4, backbone="resnet101"):
    """A DeepLab v2 ResNet + ASPP in Caffe's layer names and blob layouts, random weights:
    BatchNorm blobs (mean·f, var·f, f) with a non-trivial factor f."""
    kind, blocks, widths, stem = models.CONFIGS[backbone]
    layers = {}

    def conv_bn(conv, bn, cin, cout, k):
        layers[conv] = [(rng.standard_normal((cout, cin, k, k)) *
                         np.sqrt(2 / (cin * k * k))).astype(np.float32)]
        f = np.float32(rng.uniform(0.5, 2))
        layers["bn" + bn] = [(rng.standard_normal(cout) * 0.1 * f).astype(np.float32),
                             ((rng.random(cout) + 0.5) * f).astype(np.float32),
                             np.float32([f])]
        layers["scale" + bn] = [(rng.random(cout) * 0.5 + 0.25).astype(np.float32),
                                (rng.standard_normal(cout) * 0.1).astype(np.float32)]

    conv_bn("conv1", "_conv1", 3, stem, 7)
    numbered = [n > 3 for n in blocks] if backbone == "resnet101" else [False] * 4
    cin = stem
    for stage, names in enumerate(caffe.block_names(blocks, numbered)):
        mid = widths[stage]
        for i, name in enumerate(names):
            conv_bn(f"{name}_branch2a", f"{name[3:]}_branch2a", cin, mid, 1)
            conv_bn(f"{name}_branch2b", f"{name[3:]}_branch2b", mid, mid, 3)
            conv_bn(f"{name}_branch2c", f"{name[3:]}_branch2c", mid, 4 * mid, 1)
            if i == 0:
                conv_bn(f"{name}_branch1", f"{name[3:]}_branch1", cin, 4 * mid, 1)
            cin = 4 * mid
    for i in range(4):
        layers[f"fc1_voc12_c{i}"] = [
            (rng.standard_normal((num_classes, cin, 3, 3)) * 0.01).astype(np.float32),
            (rng.standard_normal(num_classes) * 0.1).astype(np.float32)]
    return layers
