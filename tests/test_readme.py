"""The README's Python examples run as written (so the docs cannot rot)."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README.md has no python examples"
    namespace = {}
    for block in blocks:  # later blocks use names from earlier ones, as a reader would
        exec(compile(block, str(README), "exec"), namespace)


# ---- the README's command lines, on the real VOC files --------------------------------------
VOC_MINI = README.parent.parent / "shared" / "data" / "voc_mini"
# Test-sized stand-ins for what the commands name: few iterations, small crops and batches.
SMALL = {"--iterations 20000": "--iterations 4", "--batch-size 10": "--batch-size 2 --crop 97",
         "--split train_aug": "--split train", "--subset 100": "--subset 1"}
# Random stand-in weights (statistics estimated on the photos, see the fixture) are not a
# trained network: every pixel's features share one large component, so the head's step is
# far larger than with ImageNet features, and at DeepLab's 2.5e-4 the loss of these few
# small batches swings (one of three seeds ended above its start).  The check runs at 1e-4.
STAND_IN_LR = {"--lr 2.5e-4": "--lr 1e-4"}


def readme_commands():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Command line"):text.index("## What is here")]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def _stand_in_weights(path, backbone):
    """torchvision-format weights of a random ResNet with the VOC photos' batch-norm
    statistics (see benchmarks/voc_run.py)."""
    from tinydeeplab.benchmarks.voc_run import stand_in_weights

    stand_in_weights(path, backbone, VOC_MINI)


def _half_size_voc(folder):
    """The three VOC pairs in VOC's layout at half their size (photos as JPEG, labels as
    palette PNG, as VOC stores them): every command below runs on them as on VOC, in a
    quarter of the CRF's and the full-image network's time."""
    import shutil

    from PIL import Image

    shutil.copytree(VOC_MINI / "ImageSets", folder / "ImageSets")
    for sub, suffix, resample in (("JPEGImages", ".jpg", Image.BILINEAR),
                                  ("SegmentationClass", ".png", Image.NEAREST)):
        (folder / sub).mkdir(parents=True)
        for path in (VOC_MINI / sub).glob("*" + suffix):
            image = Image.open(path)
            half = image.resize(((image.width + 1) // 2, (image.height + 1) // 2), resample)
            half.save(folder / sub / path.name, **({"quality": 95} if suffix == ".jpg" else {}))
    return folder


def _full_image_loss(checkpoint_or_model, root):
    import numpy as np

    from tinydeeplab import Tensor, data, no_grad
    from tinydeeplab.train import load_model, segmentation_loss

    model = checkpoint_or_model
    if isinstance(model, str):
        model, _ = load_model(model)
    ds = data.VOCSegmentation(str(root), "train")
    model.eval()
    total = 0.0
    with no_grad():
        for i in range(len(ds)):
            image, label = ds[i]
            logits = model(Tensor(data.to_input(image)[None]))
            total += segmentation_loss(logits, label[None].astype(np.int64)).item()
    return total / len(ds)


def test_readme_commands_run_on_real_voc_files(tmp_path):
    """Each command of the README's command-line block, as written but for paths and the
    test-sized settings above, on the three VOC pairs at half size: exit 0, no traceback,
    finite logged loss that falls on the training photos from the pre-trained-format
    weights."""
    import json
    import shlex
    import subprocess
    import sys

    import numpy as np
    import pytest

    if not VOC_MINI.is_dir():
        pytest.skip(f"{VOC_MINI} (three real VOC pairs) is not on this machine")
    pytest.importorskip("torch", reason="torch writes the stand-in .pth weights")
    from PIL import Image

    from tinydeeplab import caffe, models
    from caffe_helpers import deeplab_caffe_layers

    voc = _half_size_voc(tmp_path / "voc")
    _stand_in_weights(tmp_path / "resnet101-63fe2227.pth", "resnet101")
    caffe.write_caffemodel(tmp_path / "train_iter_20000.caffemodel",
                           deeplab_caffe_layers(np.random.default_rng(0), 21))
    (tmp_path / "photos").mkdir()
    Image.open(next((voc / "JPEGImages").glob("*.jpg"))).save(tmp_path / "photos" / "a.jpg")
    Image.open(next((voc / "JPEGImages").glob("*.jpg"))).save(tmp_path / "im.jpg")
    h, w = np.array(Image.open(tmp_path / "im.jpg")).shape[:2]
    probs = np.random.default_rng(0).random((21, h, w)).astype(np.float32)
    np.save(tmp_path / "probs.npy", probs / probs.sum(0))
    ran, previous_train = [], None
    for command in readme_commands():
        if command.startswith("tinydeeplab bench"):
            print(f"not run here (a benchmark, minutes long): {command}")
            continue
        line = command
        if " ... " in line:  # "the same options as before"
            line = line.replace(" ... ", " " + previous_train.split("runs/r101", 1)[1] + " ")
        for a, b in {**SMALL, **STAND_IN_LR}.items():
            line = line.replace(a, b)
        line = line.replace("VOC2012", str(voc))
        args = shlex.split(line)[1:]
        out = subprocess.run([sys.executable, "-m", "tinydeeplab.cli", *args], cwd=tmp_path,
                             capture_output=True, text=True)
        assert out.returncode == 0 and "Traceback" not in out.stderr, (line, out.stderr[-2000:])
        if args[0] == "train" and "--resume" not in args:
            previous_train = command
        ran.append(args[0])
    assert {"check-data", "train", "tune-crf", "eval", "predict", "crf", "export",
            "convert-caffe"} <= set(ran)
    log = [json.loads(r) for r in (tmp_path / "runs/r101/log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in log)
    net = models.deeplab_v2(21, "resnet101", 8)
    models.load_torchvision_resnet(net.backbone, tmp_path / "resnet101-63fe2227.pth")
    before = _full_image_loss(net, voc)
    after = _full_image_loss(str(tmp_path / "runs/r101/checkpoint.npz"), voc)
    print(f"full-image loss on the training photos: {before:.2f} before, {after:.2f} after")
    assert after < before, (before, after)


def test_voc_run_trains_from_pth_weights_and_evaluates(tmp_path, capsys):
    """benchmarks/voc_run.py (the GPU script's VOC step) on the CPU: stand-in .pth weights,
    frozen batch norm, a checkpoint and the eval scores."""
    import pytest

    if not VOC_MINI.is_dir():
        pytest.skip(f"{VOC_MINI} (three real VOC pairs) is not on this machine")
    pytest.importorskip("torch", reason="torch writes the stand-in .pth weights")
    from tinydeeplab.benchmarks import voc_run

    log = voc_run.run(VOC_MINI, tmp_path, "cpu", "resnet18", iterations=2, crop=65)
    out = capsys.readouterr().out
    assert [r["iteration"] for r in log] == [1, 2]
    assert (tmp_path / "run" / "checkpoint.npz").is_file()
    assert "loss:" in out and "miou" in out
