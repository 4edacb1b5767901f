"""The VOC loader, DeepLab's transforms, the threaded loader and the synthetic data set."""
import pathlib

import numpy as np
import pytest
from PIL import Image

from tinydeeplab import data

VOC_MINI = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "voc_mini"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return data.make_synthetic_voc(str(tmp_path_factory.mktemp("syn")), n_train=6, n_val=3,
                                   size=96, seed=0)


def test_synthetic_set_has_the_voc_layout_and_a_real_problem(synthetic):
    ds = data.VOCSegmentation(synthetic, "train")
    assert len(ds) == 6 and ds.class_names == list(data.SYNTHETIC_CLASSES)
    labels = np.stack([ds[i][1] for i in range(len(ds))])
    present = set(np.unique(labels).tolist())
    assert {0, 255} <= present and len(present - {0, 255}) >= 3  # several object classes
    assert (labels == 255).mean() > 0.01  # void borders around objects
    with Image.open(ds.mask_path(ds.ids[0])) as im:
        assert im.mode == "P"  # palette PNG, as VOC
    sizes = [(labels[i] == c).sum() for i in range(len(ds)) for c in range(1, 5)
             if (labels[i] == c).any()]
    assert max(sizes) > 4 * min(sizes)  # objects at several scales
    assert len(data.VOCSegmentation(synthetic, "trainval")) == 9


def test_synthetic_set_is_reproducible(tmp_path):
    a = data.make_synthetic_voc(str(tmp_path / "a"), 2, 1, 64, seed=3)
    b = data.make_synthetic_voc(str(tmp_path / "b"), 2, 1, 64, seed=3)
    da, db = data.VOCSegmentation(a, "val"), data.VOCSegmentation(b, "val")
    assert np.array_equal(da[0][0], db[0][0]) and np.array_equal(da[0][1], db[0][1])


def test_colour_does_not_give_the_class_away(synthetic):
    """Mean object colour per class is nearly the same: shape and texture must be learned."""
    ds = data.VOCSegmentation(synthetic, "train")
    means = {c: [] for c in range(1, 5)}
    for i in range(len(ds)):
        image, label = ds[i]
        for c in means:
            if (label == c).sum() > 50:
                means[c].append(image[label == c].mean())
    overall = [np.mean(v) for v in means.values() if v]
    assert np.ptp(overall) < 60


def test_train_transform_shapes_padding_and_flip():
    rng = np.random.default_rng(0)
    image = np.full((20, 30, 3), 200, np.uint8)
    label = np.ones((20, 30), np.uint8)
    x, y = data.train_transform(image, label, rng, crop=41, scale=None, flip=False)
    assert x.shape == (3, 41, 41) and x.dtype == np.float32 and y.dtype == np.int64
    assert (y[20:] == 255).all() and (y[:20, :30] == 1).all()  # label padded with void
    assert np.abs(x[:, 30:, 30:]).max() < 0.5  # image padded with the mean: ~0 after subtract
    x2, y2 = data.train_transform(image, label, np.random.default_rng(5), crop=15)
    assert x2.shape == (3, 15, 15) and set(np.unique(y2)) <= {1, 255}


def test_loader_is_reproducible_whatever_the_threads(synthetic):
    ds = data.VOCSegmentation(synthetic, "train")
    t = lambda i, l, r: data.train_transform(i, l, r, crop=33)  # noqa: E731
    one = list(data.Loader(ds, 2, t, seed=4, workers=1).epoch(1))
    four = list(data.Loader(ds, 2, t, seed=4, workers=4).epoch(1))
    assert len(one) == 3
    for (xa, ya), (xb, yb) in zip(one, four):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    other_epoch = next(data.Loader(ds, 2, t, seed=4).epoch(2))
    assert not np.array_equal(one[0][0], other_epoch[0])


def test_bad_data_sets_give_clear_errors(tmp_path, synthetic):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.VOCSegmentation(str(tmp_path / "nowhere"))
    root = data.make_synthetic_voc(str(tmp_path / "bad"), 3, 1, 48, seed=1)
    ds = data.VOCSegmentation(root, "train")
    # a listed image without a mask
    pathlib.Path(ds.mask_path(ds.ids[1])).unlink()
    with pytest.raises(FileNotFoundError, match="lack an image or a mask"):
        data.VOCSegmentation(root, "train")
    # a mask with values outside 0..C-1 and 255
    data.write_mask(ds.mask_path(ds.ids[1]), np.full((48, 48), 7, np.uint8))
    with pytest.raises(ValueError, match=r"values \[7\]"):
        data.VOCSegmentation(root, "train")[1]
    # a corrupt image
    pathlib.Path(ds.image_path(ds.ids[2])).write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot be read"):
        data.VOCSegmentation(root, "train")[2]
    with pytest.raises(FileNotFoundError, match="no list for split 'test'"):
        data.VOCSegmentation(root, "test")
    with pytest.raises(FileNotFoundError, match="output folder"):
        data.write_mask(str(tmp_path / "missing" / "x.png"), np.zeros((2, 2), np.uint8))


@pytest.mark.skipif(not VOC_MINI.is_dir(), reason=f"{VOC_MINI} (three real VOC pairs) is not "
                    "on this machine")
def test_real_voc_files():
    ds = data.VOCSegmentation(str(VOC_MINI), "train")
    image, label = ds[0]
    assert image.ndim == 3 and image.shape[:2] == label.shape
    assert set(np.unique(label)) <= set(range(21)) | {255} and (label == 255).any()
    x, y = data.train_transform(image, label, np.random.default_rng(0))
    assert x.shape == (3, 321, 321) and y.shape == (321, 321)


def test_palette_round_trip(tmp_path):
    mask = np.random.default_rng(0).integers(0, 21, (7, 9)).astype(np.uint8)
    data.write_mask(str(tmp_path / "m.png"), mask)
    np.testing.assert_array_equal(data.read_mask(str(tmp_path / "m.png"), 21), mask)
    assert tuple(data.voc_colormap()[15]) == (192, 128, 128)  # person
