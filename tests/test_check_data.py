"""Data checked up front: every image and mask read once, all problems listed together with
their files, before a training or evaluation second is spent; EXIF orientation and 16-bit
images read as a viewer shows them."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tinydeeplab import data, models
from tinydeeplab.train import TrainConfig, train


def _pair(root, name, image, mask, exif=None, mask_mode="P"):
    kwargs = {"exif": exif} if exif is not None else {}
    Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", **kwargs)
    m = Image.fromarray(mask)
    if mask_mode == "P":
        m = m.convert("P")
    elif mask_mode == "RGB":
        m = m.convert("RGB")
    m.save(root / "SegmentationClass" / f"{name}.png")


@pytest.fixture
def broken_set(tmp_path):
    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 60, 3), np.uint8)
    ok = np.zeros((40, 60), np.uint8)
    ok[10:30, 10:30] = 3
    _pair(root, "good", img, ok)
    bad_values = ok.copy()
    bad_values[0, 0] = 40
    _pair(root, "values", img, bad_values)
    _pair(root, "size", img, ok[:, :50])
    _pair(root, "rgbmask", img, ok, mask_mode="RGB")
    _pair(root, "void", img, np.full((40, 60), 255, np.uint8))
    _pair(root, "cut", img, ok)
    raw = (root / "JPEGImages" / "cut.jpg").read_bytes()
    (root / "JPEGImages" / "cut.jpg").write_bytes(raw[:len(raw) // 3])
    # a portrait photo stored landscape with EXIF orientation 6 (rotate 90° clockwise):
    # its mask is drawn on the upright, 40 wide and 60 high picture
    exif = Image.Exif()
    exif[0x0112] = 6
    _pair(root, "rotated", img, np.zeros((60, 40), np.uint8), exif=exif.tobytes())
    ids = ["good", "values", "size", "rgbmask", "void", "cut", "rotated", "nomask", "good"]
    Image.fromarray(img).save(root / "JPEGImages" / "nomask.jpg")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return root


def test_check_dataset_lists_every_problem_at_once(broken_set):
    report = data.check_dataset(str(broken_set), "train")
    text = "\n".join(report["problems"])
    assert "values [40], outside 0..20" in text and "values.png" in text
    assert "size: image 60×40 and mask 50×40 differ" in text
    assert "rgbmask.png has mode 'RGB'" in text
    assert "void.png has no labelled pixel" in text
    assert "cut.jpg" in text and "cannot be read" in text
    assert "nomask.png is missing" in text
    assert "lists good more than once" in text
    assert "rotated" not in text  # upright by its EXIF orientation, it fits its mask
    assert len(report["problems"]) == 7
    # class 3 (bird): good twice, values, size and cut (its mask is fine); not the RGB mask
    assert report["pixels"]["bird"] == 5 * 400
    assert report["images"] == 9


def test_train_and_eval_refuse_bad_data_before_the_first_iteration(broken_set, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(str(broken_set), str(out), crop=33, iterations=2, batch_size=1)
    with pytest.raises(ValueError, match=r"7 problems.*check-data") as e:
        train(cfg, log=lambda s: None, progress=False)
    assert "values.png" in str(e.value) and "nomask.png" in str(e.value)
    assert not (out / "log.jsonl").exists() and not (out / "checkpoint.npz").exists()
    cli = subprocess.run([sys.executable, "-m", "tinydeeplab.cli", "check-data", "--data",
                          str(broken_set)], capture_output=True, text=True)
    assert cli.returncode == 1 and "7 problems" in cli.stdout
    assert "Traceback" not in cli.stderr
    config = {"num_classes": 21, "backbone": "tiny", "output_stride": 8, "head": "aspp",
              "crf_layer": None}
    models.save_checkpoint(models.deeplab_v2(21, "tiny"), tmp_path / "c.npz",
                           config=json.dumps(config))
    cli = subprocess.run([sys.executable, "-m", "tinydeeplab.cli", "eval", "--data",
                          str(broken_set), "--split", "train", "--checkpoint",
                          str(tmp_path / "c.npz")], capture_output=True, text=True)
    assert cli.returncode == 1 and "7 problems" in cli.stderr and "Traceback" not in cli.stderr


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, :10] = 255  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer turns it 90° clockwise: white on top
    Image.fromarray(img).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    got = data.read_image(str(tmp_path / "r.jpg"))
    assert got.shape == (30, 20, 3)
    assert got[:8].mean() > 200 and got[12:].mean() < 50


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    got = data.read_image(str(tmp_path / "deep.png"))
    assert got.dtype == np.uint8 and got.shape == (8, 8, 3)
    np.testing.assert_array_equal(got[..., 0], np.rint(ramp / 257).astype(np.uint8))
    assert (got == 255).mean() < 0.05  # PIL's convert("RGB") makes almost all of it white
