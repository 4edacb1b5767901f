"""Inputs that used to lose data or give a silent wrong answer (issue: nothing lost, nothing
silent): each case is refused with a message naming the argument, or warned about."""
import os

import numpy as np
import pytest

from tinydeeplab import crf, data, models


def tiny_net(classes=3):
    return models.deeplab_v2(classes, "tiny", 8, seed=0)


@pytest.mark.parametrize("extra, what", [({"note": None}, "note"), ({"meta": {"a": 1}}, "meta"),
                                         ({"ragged": [1, [2, 3]]}, "ragged")])
def test_save_checkpoint_refuses_extras_it_could_not_load(tmp_path, extra, what):
    """None, a dict or a ragged list would be pickled into the file, which load_checkpoint
    (no pickles) then rejects whole: refused at save time, nothing written."""
    path = tmp_path / "c.npz"
    with pytest.raises(TypeError, match=what):
        models.save_checkpoint(tiny_net(), path, **extra)
    assert not os.listdir(tmp_path)
    models.save_checkpoint(tiny_net(), path, iteration=3, config='{"a": 1}')  # these load
    assert models.load_checkpoint(tiny_net(), path)["iteration"] == 3


def test_load_checkpoint_refuses_non_finite_weights(tmp_path):
    """A checkpoint of a diverged run (NaN weights) used to load and predict background
    everywhere."""
    net = tiny_net()
    first = next(iter(net.state_dict()))
    state = net.state_dict()
    state[first] = state[first].copy()
    state[first].flat[0] = np.nan
    net.load_state_dict(state)
    models.save_checkpoint(net, tmp_path / "nan.npz")
    with pytest.raises(ValueError, match=f"non-finite.*{first}"):
        models.load_checkpoint(tiny_net(), tmp_path / "nan.npz")


@pytest.mark.parametrize("scale", [7.5, 1e-9, 0.0])
def test_dense_crf_refuses_probabilities_that_do_not_sum_to_one(scale):
    """×7.5 used to agree with the right answer on about half the pixels."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), (6, 7)).transpose(2, 0, 1).astype(np.float32)
    image = rng.integers(0, 256, (6, 7, 3)).astype(np.uint8)
    crf.dense_crf(image, probs, iterations=1)  # sums to 1: fine
    with pytest.raises(ValueError, match="sum to 1"):
        crf.dense_crf(image, probs * np.float32(scale), iterations=1)
    with pytest.raises(ValueError, match="floating-point"):
        crf.dense_crf(image, (probs * 100).astype(np.int64), iterations=1)


def test_model_and_crf_arguments_out_of_range():
    with pytest.raises(ValueError, match="num_classes"):
        models.deeplab_v2(0, "tiny", 8)
    with pytest.raises(ValueError, match="W=2.5"):
        crf.DenseCRF2D(2.5, 4, 3)
    d = crf.DenseCRF2D(5, 4, 3)
    with pytest.raises(ValueError, match="compat"):
        d.addPairwiseGaussian(sxy=3, compat=float("nan"))
    with pytest.raises(ValueError, match="compat"):
        d.addPairwiseGaussian(sxy=3, compat=np.full((3, 3), np.inf))


def test_empty_classes_file_is_a_clear_error(tmp_path):
    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=2, n_val=1, size=32)
    open(os.path.join(root, "classes.txt"), "w").close()
    with pytest.raises(ValueError, match="classes.txt"):
        data.VOCSegmentation(root, "train")


def test_crf_layer_warns_about_images_in_0_to_1():
    from tinydeeplab import Tensor

    layer = crf.CRFLayer(iterations=1)
    logits = Tensor(np.zeros((1, 2, 5, 6), np.float32))
    with pytest.warns(UserWarning, match="0..255"):
        layer(logits, np.random.default_rng(0).random((1, 5, 6, 3)))


# The diverging step overflows batch norm's running variance (a float32 cast) before the loss
# check stops the run: expected here.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_training_that_diverges_stops_and_keeps_the_last_checkpoint(tmp_path):
    """lr 1e6 used to log NaN losses, overwrite the checkpoint with NaN weights and exit 0."""
    import json
    import subprocess
    import sys

    from tinydeeplab.train import TrainConfig, TrainingDiverged, train

    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=4, n_val=1, size=48)
    cfg = TrainConfig(root, str(tmp_path / "run"), crop=33, scale=None, batch_size=2,
                      iterations=30, lr=1e6, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="diverged at iteration") as caught:
        train(cfg, log=lambda s: None, progress=False)
    assert "--lr" in str(caught.value)
    done = json.loads(open(tmp_path / "run" / "log.jsonl").read().splitlines()[-1])
    assert np.isfinite(done["loss"])  # no non-finite record was logged
    net = models.deeplab_v2(5, "tiny", 8)
    extra = models.load_checkpoint(net, tmp_path / "run" / "checkpoint.npz")  # finite weights
    assert 1 <= int(extra["iteration"]) <= done["iteration"]
    out = subprocess.run([sys.executable, "-m", "tinydeeplab.cli", "train", "--data", root,
                          "--out", str(tmp_path / "cli"), "--iterations", "30", "--crop", "33",
                          "--batch-size", "2", "--lr", "1e6"], capture_output=True, text=True)
    assert out.returncode != 0 and "diverged" in out.stderr and "Traceback" not in out.stderr


def test_stale_checkpoint_temporaries_are_removed_on_the_next_start(tmp_path):
    """A save killed mid-write left tmp*.npz.tmp behind forever; now the next run removes the
    temporaries whose writer is gone, and leaves a live writer's alone."""
    import subprocess
    import sys

    from tinydeeplab.train import TrainConfig, train

    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=2, n_val=1, size=40)
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = run / f".checkpoint.npz.{dead}.abc123.tmp"
    live = run / f".checkpoint.npz.{os.getpid()}.def456.tmp"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y")
    messages = []
    train(TrainConfig(root, str(run), crop=33, scale=None, batch_size=2, iterations=1),
          log=messages.append, progress=False)
    assert not stale.exists() and live.exists()
    assert any("killed" in m for m in messages)


def test_resume_truncates_the_log_to_the_checkpoint(tmp_path):
    """A resumed run used to keep the records of the iterations it redid (twice in the log),
    and a torn last line made the finished run fail reading its log."""
    import json

    from tinydeeplab.cli import _read_log
    from tinydeeplab.train import TrainConfig, train

    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=2, n_val=1, size=40)
    kw = dict(crop=33, scale=None, batch_size=2, checkpoint_every=2)
    train(TrainConfig(root, str(tmp_path / "run"), iterations=4, **kw), log=lambda s: None,
          progress=False)
    log = tmp_path / "run" / "log.jsonl"
    with open(log, "a") as f:  # as if killed after iteration 5, in the middle of a record
        f.write(json.dumps({"iteration": 5, "loss": 1.0, "lr": 0.1, "images_per_s": 1}) + "\n")
        f.write('{"iteration": 6, "lo')
    assert [r["iteration"] for r in _read_log(str(log))] == [1, 2, 3, 4, 5]  # torn line skipped
    train(TrainConfig(root, str(tmp_path / "run"), iterations=6, resume=True, **kw),
          log=lambda s: None, progress=False)
    assert [r["iteration"] for r in _read_log(str(log))] == [1, 2, 3, 4, 5, 6]


# ---- predict never overwrites --------------------------------------------------------------
def _tiny_checkpoint(path, classes=21):
    import json

    config = {"num_classes": classes, "backbone": "tiny", "output_stride": 8, "head": "aspp",
              "crf_layer": None}
    models.save_checkpoint(tiny_net(classes), path, config=json.dumps(config))
    return str(path)


def _cli(*args, cwd=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tinydeeplab.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def test_predict_never_overwrites_an_input_and_keeps_same_stem_outputs_apart(tmp_path):
    """predict DIR --out DIR used to overwrite an input PNG with its mask, and x.jpg and
    x.png both wrote x.png."""
    from PIL import Image

    ckpt = _tiny_checkpoint(tmp_path / "c.npz")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(photos / "x.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(photos / "x.png")
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(photos / "y.bmp")
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(photos / "z.png")
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    out = _cli("predict", photos, "--checkpoint", ckpt, "--out", photos)
    assert out.returncode == 1 and "overwrite an input" in out.stderr
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before  # nothing written
    out = _cli("predict", photos, "--checkpoint", ckpt, "--out", tmp_path / "masks")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == [
        "x_jpg.png", "x_jpg_overlay.jpg", "x_png.png", "x_png_overlay.jpg", "y.png",
        "y_overlay.jpg", "z.png", "z_overlay.jpg"]


def test_predict_skips_a_fifo_and_reports_other_files(tmp_path):
    """A FIFO in the input folder used to hang predict; files that are not images were
    skipped without a word."""
    from PIL import Image

    ckpt = _tiny_checkpoint(tmp_path / "c.npz")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(photos / "a.jpg")
    os.mkfifo(photos / "pipe.jpg")
    (photos / "notes.txt").write_text("hello")
    out = _cli("predict", photos, "--checkpoint", ckpt, "--out", tmp_path / "m")
    assert out.returncode == 0, out.stderr
    assert "skipped 2 files" in out.stdout and "pipe.jpg (not a regular file)" in out.stdout
    assert "notes.txt" in out.stdout


# ---- one run per folder; resume checks ------------------------------------------------------
def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    """Two runs into one --out used to interleave their logs and replace each other's
    checkpoint.  The lock dies with its process: a killed run does not block --resume."""
    import signal
    import subprocess
    import sys
    import time

    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=4, n_val=1, size=40)
    args = ["train", "--data", root, "--out", tmp_path / "run", "--crop", "33",
            "--batch-size", "2", "--iterations", "100000", "--checkpoint-every", "1"]
    first = subprocess.Popen([sys.executable, "-m", "tinydeeplab.cli", *map(str, args)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "checkpoint.npz").exists():
            assert time.time() < deadline and first.poll() is None, first.stderr
            time.sleep(0.2)
        second = _cli(*args, "--resume")
        assert second.returncode == 1
        assert f"process {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    args[args.index("100000")] = "2"
    resumed = _cli(*args, "--resume")  # the killed run's lock is gone with it
    assert resumed.returncode == 0, resumed.stderr


def test_resume_refuses_other_settings_and_says_when_there_is_nothing(tmp_path):
    """--resume used to rewrite the stored configuration with whatever was given, and with
    no checkpoint it silently started from scratch."""
    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=4, n_val=1, size=40)
    base = ["train", "--data", root, "--out", tmp_path / "run", "--crop", "33",
            "--batch-size", "2", "--iterations", "2"]
    out = _cli(*base, "--resume")
    assert out.returncode == 1 and "nothing to resume" in out.stderr
    assert _cli(*base).returncode == 0
    out = _cli(*base[:-1], "3", "--resume", "--crop", "41", "--seed", "4")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "--crop: 33 in the checkpoint, 41 now" in out.stderr
    assert "--seed: 0 in the checkpoint, 4 now" in out.stderr
    out = _cli(*base[:-1], "3", "--resume")  # a longer schedule is allowed, and said
    assert out.returncode == 0 and "run of 2 iterations for 3" in out.stdout


def test_ctrl_c_saves_the_last_whole_iteration_and_says_how_to_resume(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=4, n_val=1, size=40)
    args = ["train", "--data", root, "--out", tmp_path / "run", "--crop", "33",
            "--batch-size", "2", "--iterations", "100000", "--checkpoint-every", "100000"]
    proc = subprocess.Popen([sys.executable, "-m", "tinydeeplab.cli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "--resume" in err
    extra = models.load_checkpoint(models.deeplab_v2(5, "tiny"), tmp_path / "run" /
                                   "checkpoint.npz")
    assert int(extra["iteration"]) >= 3 and f"iteration {int(extra['iteration'])}" in err


def test_files_written_atomically_get_the_usual_permissions(tmp_path):
    """Writing through a temporary (mkstemp: mode 0600) must not leave outputs private."""
    import stat

    old = os.umask(0o022)
    try:
        models.save_checkpoint(tiny_net(), tmp_path / "c.npz")
        data.write_mask(str(tmp_path / "m.png"), np.zeros((4, 4), np.uint8))
    finally:
        os.umask(old)
    for name in ("c.npz", "m.png"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
