"""The command line misused as a user would: each case run as a subprocess must end with a
one-line message naming what is wrong, a non-zero exit status, no traceback, and no file
left behind (the folder holds exactly what it held before)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tinydeeplab import data, models


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small data set, a checkpoint, a truncated checkpoint, an image, probabilities, a
    regular file where a folder is expected."""
    root = tmp_path_factory.mktemp("world")
    data.make_synthetic_voc(str(root / "set"), n_train=3, n_val=2, size=40, seed=0)
    config = {"num_classes": 5, "backbone": "tiny", "output_stride": 8, "head": "aspp",
              "crf_layer": None}
    models.save_checkpoint(models.deeplab_v2(5, "tiny"), root / "c.npz",
                           config=json.dumps(config))
    raw = (root / "c.npz").read_bytes()
    (root / "cut.npz").write_bytes(raw[:len(raw) // 2])
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "im.png")
    probs = np.full((5, 40, 40), 0.2, np.float32)
    np.save(root / "probs.npy", probs)
    (root / "afile").write_text("not a folder")
    (root / "outdir").mkdir()
    return root


CASES = [  # (arguments, what the message must say)
    (["predict", "im.png", "--checkpoint", "c.npz", "--out", "afile/masks"], "afile"),
    (["predict", "im.png", "--checkpoint", "c.npz", "--out", "afile"], "not a folder"),
    (["train", "--data", "set", "--out", "afile/run", "--iterations", "1", "--crop", "33"],
     "afile"),
    (["demo", "--out", "afile/demo", "--iterations", "1"], "afile"),
    (["crf", "--image", "im.png", "--probs", "probs.npy", "--out", "outdir"], "is a folder"),
    (["crf", "--image", "im.png", "--probs", "probs.npy", "--out", "mask.bmp"], ".png"),
    (["crf", "--image", "im.png", "--probs", "probs.npy", "--out", "mask.jpg"], ".png"),
    (["eval", "--data", "set", "--checkpoint", "c.npz", "--json", "outdir"], "is a folder"),
    (["eval", "--data", "set", "--checkpoint", "cut.npz"], "not a readable .npz"),
    (["predict", "im.png", "--checkpoint", "cut.npz", "--out", "m"], "not a readable .npz"),
    (["train", "--data", "set", "--out", "r", "--init", "cut.npz", "--iterations", "1",
      "--crop", "33"], "not a readable .npz"),
    (["eval", "--data", "set", "--checkpoint", "c.npz", "--scales", "nan"], "finite"),
    (["eval", "--data", "set", "--checkpoint", "c.npz", "--scales", "1,inf"], "finite"),
    (["train", "--data", "set", "--out", "r", "--lr-policy", "step", "--step-size", "0",
      "--iterations", "1"], "--step-size must be ≥ 1"),
    (["train", "--data", "set", "--out", "r", "--device", "cuda", "--iterations", "1"],
     "no CUDA GPU"),
    (["eval", "--data", "set", "--checkpoint", "c.npz", "--device", "cuda"], "no CUDA GPU"),
    (["train", "--data", "set", "--out", "r", "--resume", "--iterations", "1"],
     "nothing to resume"),
    (["train", "--data", "set", "--out", "r", "--freeze-bn", "--iterations", "1"],
     "--freeze-bn needs"),
    (["train", "--data", "set", "--out", "r", "--pretrained", "im.png", "--iterations", "1"],
     "PyTorch weights"),
    (["train", "--data", "missing", "--out", "r"], "does not exist"),
    (["eval", "--data", "set", "--checkpoint", "c.npz", "--crf-params", "probs.npy"],
     "not valid JSON"),
    (["export", "c.npz", "out.h5"], "must end in .npz or .pth"),
    (["convert-caffe", "im.png", "x.npz"], "caffemodel"),
    (["tune-crf", "--data", "set", "--checkpoint", "c.npz", "--out", "outdir"], "is a folder"),
    (["check-data", "--data", "set", "--split", "nosuchsplit"], "no list for split"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in
                                                      CASES])
def test_misuse_ends_with_a_message_and_leaves_nothing(world, args, message):
    before = sorted(p for p in os.listdir(world))
    out = subprocess.run([sys.executable, "-m", "tinydeeplab.cli", *args], cwd=world,
                         capture_output=True, text=True,
                         env={**os.environ, "TDL_CACHE": str(world / "cache")})
    assert out.returncode in (1, 2), (out.returncode, out.stderr[-500:])
    assert "Traceback" not in out.stderr, out.stderr[-1500:]
    assert message in out.stderr, out.stderr[-500:]
    assert sorted(os.listdir(world)) == before  # no folder, no temporary, no half file
    assert sorted(os.listdir(world / "outdir")) == []


def test_a_full_disk_while_saving_is_a_message_and_leaves_no_temporary(world, tmp_path):
    """The file-size limit stands in for a full disk: the checkpoint write fails with an
    OSError like ENOSPC's.  The message says so; no temporary file is left."""
    import resource
    import signal

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "tinydeeplab.cli", "train", "--data",
                          str(world / "set"), "--out", str(run), "--iterations", "2",
                          "--crop", "33", "--batch-size", "1"],
                         capture_output=True, text=True, preexec_fn=small_files)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-1500:]
    assert "File too large" in out.stderr
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
    assert not (run / "checkpoint.npz").exists()
