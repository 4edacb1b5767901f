"""The photograph shipped for lesson 08: readable, annotated, and its annotation reproducible."""
import hashlib
import os
import pathlib
import runpy
import shutil

import numpy as np

from tinydeeplab import lessons

PHOTOS = pathlib.Path(lessons.__file__).resolve().parent / "photos"


def test_photograph_and_labels_match():
    image, labels, names = lessons.photograph()
    assert image.shape == (427, 640, 3) and image.dtype == np.uint8
    assert labels.shape == (427, 640) and names == ("sky", "rocket", "tower")
    assert set(np.unique(labels)) == {0, 1, 2, 255}
    assert (labels[336:] == 255).all() and (labels[:336] != 255).mean() > 0.9
    # the rocket is bright against the sky, the sky dark blue
    assert image[labels == 1].mean() > 1.5 * image[labels == 0].mean()


def test_photograph_is_the_published_file():
    digest = hashlib.sha256((PHOTOS / "rocket.jpg").read_bytes()).hexdigest()
    assert digest == "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"


def test_annotation_script_reproduces_the_labels(tmp_path):
    shutil.copy(PHOTOS / "rocket.jpg", tmp_path / "rocket.jpg")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        runpy.run_path(str(PHOTOS / "annotate_rocket.py"), run_name="__main__")
    finally:
        os.chdir(cwd)
    from tinydeeplab import data

    made = data.read_mask(str(tmp_path / "rocket_labels.png"), 3)
    shipped = data.read_mask(str(PHOTOS / "rocket_labels.png"), 3)
    # JPEG decoders may differ by a level on a few pixels; the annotation must not move
    assert (made != shipped).mean() < 1e-3
