"""Weights in and out: torch's .pth read without torch, DeepLab's Caffe models read without
Caffe (a hand-written protobuf reader), and a trained network exported for PyTorch.

torchvision itself is not a test dependency (the wheel on these machines is a CUDA build whose
extension does not load against the CPU torch); ``benchmarks/torch_twin.TorchResNet`` is a
PyTorch module with torchvision's ResNet layout and parameter names, saved by ``torch.save``
exactly as a torchvision model's ``state_dict()`` would be."""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tinydeeplab import Tensor, caffe, models, no_grad, pth
from tinydeeplab.data import MEAN_RGB

from caffe_helpers import deeplab_caffe_layers

torch = pytest.importorskip("torch", reason="torch (the [test] extra) writes the reference "
                                            ".pth files and runs the reference networks")
from tinydeeplab.benchmarks.torch_twin import TorchResNet, paired  # noqa: E402

tF = torch.nn.functional


# ---- .pth ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pth_reader_equals_torch_save_of_a_resnet50_state_dict(tmp_path, legacy):
    torch.manual_seed(0)
    state = TorchResNet("resnet50", 8).state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    got = pth.state_dict(path)
    assert list(got) == list(state)  # fc.* and num_batches_tracked included, in order
    for k, v in state.items():
        assert got[k].dtype == v.numpy().dtype and got[k].shape == tuple(v.shape), k
        np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pth_reader_views_dtypes_and_wrappers(tmp_path, legacy):
    t = torch.arange(35, dtype=torch.float64).reshape(5, 7)
    obj = {"state_dict": {"module.t": t.t(), "module.corner": t[1:, 2:5],
                          "module.bf16": torch.tensor([1.5, -2.25, 3e-3], dtype=torch.bfloat16),
                          "module.half": torch.tensor([0.1, 7], dtype=torch.float16),
                          "module.long": torch.tensor([-3, 2 ** 40]),
                          "module.flag": torch.tensor([True, False]),
                          "module.empty": torch.zeros(0, 3), "module.scalar": torch.tensor(4.0)},
           "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    got = pth.state_dict(path)  # the dict under state_dict, DataParallel's prefix dropped
    for k, v in obj["state_dict"].items():
        expect = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        np.testing.assert_array_equal(got[k[7:]], expect, err_msg=k)
        assert got[k[7:]].shape == tuple(v.shape)


def test_pth_reader_does_not_need_torch(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(TorchResNet("resnet18", 8).state_dict(), path)
    code = ("import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
            "from tinydeeplab import models\n"
            "net = models.deeplab_v2(3, 'resnet18', 8)\n"
            f"models.load_torchvision_resnet(net.backbone, {str(path)!r})\nprint('loaded')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr


def test_pth_reader_refuses_other_pickles_and_damaged_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": Evil()}, path)
    with pytest.raises(ValueError, match=r"pickled (posix|os)\.system.*refusing"):
        pth.load(path)
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(1000)}, good)
    raw = good.read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        pth.load(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(ValueError, match="not a PyTorch weights file"):
        pth.load(tmp_path / "text.pth")
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(tmp_path / "nodata.pth", "w") as out:
        for name in z.namelist():
            if "/data/" not in name:
                out.writestr(name, z.read(name))
    with pytest.raises(ValueError, match="lacks the tensor data"):
        pth.load(tmp_path / "nodata.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pth.load(tmp_path / "missing.pth")


def test_pretrained_pth_gives_the_torch_twins_features(tmp_path):
    torch.manual_seed(1)
    body = TorchResNet("resnet50", 8)
    from tinydeeplab.benchmarks.torch_twin import randomise_batch_norm

    randomise_batch_norm(body, 1)
    body.eval()
    torch.save(body.state_dict(), tmp_path / "r50.pth")
    state, style = models.read_pretrained(tmp_path / "r50.pth", "resnet50")
    assert style == "torchvision"
    ours = models.ResNet("resnet50", 8)
    models.load_torchvision_resnet(ours, state)
    x = np.random.default_rng(0).standard_normal((1, 3, 37, 45)).astype(np.float32)
    with no_grad():
        y = ours.eval()(Tensor(x)).data
    with torch.no_grad():
        expect = body(torch.tensor(x)).numpy()
    np.testing.assert_allclose(y, expect, rtol=1e-3, atol=1e-3 * np.abs(expect).max())


# ---- Caffe --------------------------------------------------------------------------------------
def test_caffemodel_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    layers = {"conv1": [rng.standard_normal((5, 3, 7, 7)).astype(np.float32)],
              "bn_conv1": [rng.random(5).astype(np.float32), rng.random(5).astype(np.float32),
                           np.array([0.5], np.float32)],
              "fc": [rng.standard_normal((3, 4)).astype(np.float32),
                     np.float32([np.pi, -0.0, 1e-30])]}
    caffe.write_caffemodel(tmp_path / "net.caffemodel", layers)
    got = caffe.read_caffemodel(tmp_path / "net.caffemodel")
    assert list(got) == list(layers)
    for name in layers:
        for a, b in zip(layers[name], got[name]):
            assert a.shape == b.shape
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_caffemodel_old_layout_v1_layers_and_unpacked_floats(tmp_path):
    """Old Caffe files: V1LayerParameter (NetParameter field 2, name in field 4, blobs in 6)
    and blob sizes as num/channels/height/width with one float per field."""
    k, ld, v = caffe._key, caffe._length_delimited, caffe._encode_varint
    values = np.float32([1.5, -2, 0.25, 8, 3, 1e-3])
    blob = k(1, 0) + v(1) + k(2, 0) + v(2) + k(3, 0) + v(1) + k(4, 0) + v(3)
    blob += b"".join(k(5, 5) + x.tobytes() for x in values)
    layer = ld(4, b"old_conv") + ld(6, blob)
    (tmp_path / "old.caffemodel").write_bytes(ld(2, layer))
    got = caffe.read_caffemodel(tmp_path / "old.caffemodel")
    np.testing.assert_array_equal(got["old_conv"][0], values.reshape(1, 2, 1, 3))


def test_damaged_or_foreign_caffemodel_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    caffe.write_caffemodel(tmp_path / "a.caffemodel",
                           {"conv1": [rng.standard_normal((8, 3, 7, 7)).astype(np.float32)]})
    raw = (tmp_path / "a.caffemodel").read_bytes()
    (tmp_path / "cut.caffemodel").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="truncated or of another kind"):
        caffe.read_caffemodel(tmp_path / "cut.caffemodel")
    (tmp_path / "img.caffemodel").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match="caffemodel"):
        caffe.read_caffemodel(tmp_path / "img.caffemodel")
    with pytest.raises(ValueError, match="not a ResNet Caffe model"):
        caffe.deeplab_state({"fc7": [np.zeros(3, np.float32)]})
    with pytest.raises(FileNotFoundError):
        caffe.read_caffemodel(tmp_path / "nope.caffemodel")


def _caffe_forward(layers, bgr, blocks, numbered):
    """DeepLab v2's Caffe network in PyTorch, straight from Caffe's layer names: BGR input,
    strides on the 1×1 reduction, ceil-mode pooling, dilation 2 and 4 in res4 and res5."""
    t = {k: [torch.tensor(b) for b in v] for k, v in layers.items()}

    def cbr(x, conv, bn, stride=1, dilation=1, relu=True):
        w = t[conv][0]
        pad = dilation * (w.shape[-1] // 2)
        x = tF.conv2d(x, w, None, stride, pad, dilation)
        mean, var, f = t["bn" + bn]
        x = tF.batch_norm(x, mean / f, var / f, t["scale" + bn][0], t["scale" + bn][1],
                          False, 0.0, 1e-5)
        return torch.relu(x) if relu else x

    x = cbr(bgr, "conv1", "_conv1", stride=2)
    x = tF.max_pool2d(x, 3, 2, 1, ceil_mode=True)
    for stage, names in enumerate(caffe.block_names(blocks, numbered)):
        stride, dilation = [(1, 1), (2, 1), (1, 2), (1, 4)][stage]
        for i, name in enumerate(names):
            s = stride if i == 0 else 1
            out = cbr(x, f"{name}_branch2a", f"{name[3:]}_branch2a", s)
            out = cbr(out, f"{name}_branch2b", f"{name[3:]}_branch2b", 1, dilation)
            out = cbr(out, f"{name}_branch2c", f"{name[3:]}_branch2c", relu=False)
            idt = cbr(x, f"{name}_branch1", f"{name[3:]}_branch1", s, relu=False) \
                if i == 0 else x
            x = torch.relu(out + idt)
    return sum(tF.conv2d(x, t[f"fc1_voc12_c{i}"][0], t[f"fc1_voc12_c{i}"][1], 1, r, r)
               for i, r in enumerate((6, 12, 18, 24)))


def test_deeplab_resnet101_caffemodel_converts_to_the_same_network(tmp_path):
    """Every layer of a full ResNet-101 + ASPP Caffe file is used, and the converted network
    on an RGB image gives the logits of Caffe's network (run here in PyTorch) on BGR."""
    rng = np.random.default_rng(0)
    layers = deeplab_caffe_layers(rng)
    caffe.write_caffemodel(tmp_path / "voc12.caffemodel", layers)
    state, num_classes, unused = caffe.deeplab_state(
        caffe.read_caffemodel(tmp_path / "voc12.caffemodel"))
    assert num_classes == 4 and unused == []
    net = models.deeplab_v2(4, "resnet101", 8, style="caffe")
    assert set(state) == set(net.state_dict())
    config = caffe.convert(tmp_path / "voc12.caffemodel", tmp_path / "voc12.npz",
                           log=lambda s: None)
    assert config["style"] == "caffe" and config["num_classes"] == 4
    from tinydeeplab.train import load_model

    model, _ = load_model(str(tmp_path / "voc12.npz"))
    rgb = rng.uniform(0, 255, (1, 41, 49, 3)).astype(np.float32)
    x = (rgb - MEAN_RGB).transpose(0, 3, 1, 2)
    with no_grad():
        ours = model(Tensor(np.ascontiguousarray(x))).data
    bgr = (rgb[..., ::-1] - MEAN_RGB[::-1]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        expect = _caffe_forward(layers, torch.tensor(np.ascontiguousarray(bgr)),
                                models.CONFIGS["resnet101"][1], [False, True, True, False])
    assert ours.shape == tuple(expect.shape)
    np.testing.assert_allclose(ours, expect.numpy(), rtol=1e-3,
                               atol=2e-3 * float(expect.abs().max()))


def test_imagenet_caffemodel_becomes_a_pretrained_backbone(tmp_path):
    rng = np.random.default_rng(1)
    layers = deeplab_caffe_layers(rng, backbone="resnet50")
    for i in range(4):
        del layers[f"fc1_voc12_c{i}"]
    layers["fc1000"] = [np.zeros((10, 2048), np.float32), np.zeros(10, np.float32)]
    caffe.write_caffemodel(tmp_path / "init.caffemodel", layers)
    logs = []
    config = caffe.convert(tmp_path / "init.caffemodel", tmp_path / "init.npz", "resnet50",
                           log=logs.append)
    assert config["num_classes"] is None and "fc1000" in logs[0]
    direct, style = models.read_pretrained(tmp_path / "init.caffemodel", "resnet50")
    converted, style2 = models.read_pretrained(tmp_path / "init.npz", "resnet50")
    assert style == style2 == "caffe" and set(direct) == set(converted)
    for k in direct:
        np.testing.assert_array_equal(direct[k], converted[k])
    from tinydeeplab.train import load_model

    with pytest.raises(ValueError, match="backbone without a classifier.*--pretrained"):
        load_model(str(tmp_path / "init.npz"))


# ---- export -------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npz", ".pth"])
def test_export_loads_into_a_pytorch_twin_with_the_same_logits(tmp_path, suffix):
    ours, body, twin = paired("resnet18", 8, num_classes=3, seed=2)
    config = {"num_classes": 3, "backbone": "resnet18", "output_stride": 8, "head": "aspp",
              "aspp_rates": [6, 12, 18, 24], "crf_layer": None, "style": "torchvision"}
    models.save_checkpoint(ours, tmp_path / "c.npz", config=json.dumps(config))
    out = subprocess.run([sys.executable, "-m", "tinydeeplab.cli", "export",
                          str(tmp_path / "c.npz"), str(tmp_path / f"e{suffix}")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    exported = (dict(np.load(tmp_path / "e.npz")) if suffix == ".npz" else
                {k: v.numpy() for k, v in torch.load(tmp_path / "e.pth").items()})
    fresh = TorchResNet("resnet18", 8)
    missing, unexpected = fresh.load_state_dict(
        {k[9:]: torch.tensor(v) for k, v in exported.items() if k.startswith("backbone.")},
        strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    heads = torch.nn.ModuleList(torch.nn.Conv2d(512, 3, 3, 1, r, r) for r in (6, 12, 18, 24))
    heads.load_state_dict({k[14:]: torch.tensor(v) for k, v in exported.items()
                           if k.startswith("head.branches.")})
    x = np.random.default_rng(3).standard_normal((1, 3, 35, 43)).astype(np.float32)
    fresh.eval(), body.eval()
    with torch.no_grad():
        t = torch.tensor(x)
        expect = sum(h(fresh(t)) for h in heads).numpy()
        original = twin(t).numpy()
    with no_grad():
        got = ours.eval()(Tensor(x)).data
    np.testing.assert_allclose(expect, original, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, expect, rtol=1e-3, atol=1e-3 * np.abs(expect).max())


def test_export_refuses_other_suffixes(tmp_path):
    ours = models.deeplab_v2(2, "tiny")
    config = {"num_classes": 2, "backbone": "tiny", "output_stride": 8, "head": "aspp",
              "crf_layer": None}
    models.save_checkpoint(ours, tmp_path / "c.npz", config=json.dumps(config))
    out = subprocess.run([sys.executable, "-m", "tinydeeplab.cli", "export",
                          str(tmp_path / "c.npz"), str(tmp_path / "e.h5")],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "must end in .npz or .pth" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "e.h5").exists()


def test_train_from_a_caffemodel_builds_the_caffe_layout(tmp_path):
    """train --pretrained X.caffemodel: the run uses the MSRA layout the weights were trained
    in, records it, and eval rebuilds it from the checkpoint."""
    from tinydeeplab import data
    from tinydeeplab.train import TrainConfig, load_model, train

    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=2, n_val=1, size=40)
    layers = deeplab_caffe_layers(np.random.default_rng(2), backbone="resnet50")
    for i in range(4):
        del layers[f"fc1_voc12_c{i}"]
    caffe.write_caffemodel(tmp_path / "init.caffemodel", layers)
    messages = []
    cfg = TrainConfig(root, str(tmp_path / "run"), backbone="resnet50", crop=33, scale=None,
                      batch_size=2, iterations=1, freeze_bn=True, lr=1e-4,
                      pretrained=str(tmp_path / "init.caffemodel"))
    model, history = train(cfg, log=messages.append, progress=False)
    assert any("caffe layout" in m for m in messages) and np.isfinite(history[0]["loss"])
    assert model.backbone.style == "caffe"
    assert model.backbone.layer2[0].conv1.stride in (2, (2, 2))  # the stride on the 1×1
    loaded, config = load_model(str(tmp_path / "run" / "checkpoint.npz"))
    assert config["style"] == "caffe" and loaded.backbone.style == "caffe"
