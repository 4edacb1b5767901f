"""What the lessons (lessons/NN_topic.py) share: where they write, where they find data.

The lessons run as scripts (``python lessons/07_permutohedral_lattice.py``) and as notebooks
(their ``# %%`` cells in VS Code, Jupyter or jupytext), where ``__file__`` does not exist and
the working directory is wherever the notebook was opened.  So nothing here looks at the
lesson's own path:

- figures and runs go to ``$TDL_OUT`` if set, else ``./lesson_out/`` in the working directory
  (never into the source tree);
- ``TDL_FAST=1`` makes every lesson smaller (the test suite's smoke test);
- the data a lesson can use when present (``../shared/data``: VOC images, the CRF examples)
  is looked for beside the working directory and beside the source checkout.
"""
import os
import pathlib


def output_dir():
    """``$TDL_OUT``, else ``./lesson_out`` in the working directory; made if missing."""
    path = pathlib.Path(os.environ.get("TDL_OUT") or "lesson_out").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def fast():
    """Whether TDL_FAST=1 asks for the small smoke-test run; says so when it does."""
    on = os.environ.get("TDL_FAST") == "1"
    if on:
        print("TDL_FAST=1: smaller sizes, a smoke test — the numbers below are not the "
              "lesson's results (run without TDL_FAST for those)")
    return on


def shared_data(*parts):
    """The path of ``shared/data/<parts>`` if it exists, else None: ``$TDL_SHARED_DATA``,
    then ``shared/data`` in or beside the working directory, then beside the checkout this
    package was installed from (an editable install)."""
    candidates = []
    if os.environ.get("TDL_SHARED_DATA"):
        candidates.append(pathlib.Path(os.environ["TDL_SHARED_DATA"]))
    cwd = pathlib.Path.cwd()
    source_root = pathlib.Path(__file__).resolve().parents[1]
    for base in (cwd, cwd.parent, source_root.parent):
        candidates.append(base / "shared" / "data")
    for root in candidates:
        path = root.joinpath(*parts)
        if path.exists():
            return path
    return None


def recorded_result(name):
    """The path of a result file recorded under benchmarks/ (installed with the package as
    ``tinydeeplab.benchmarks``), or None."""
    from tinydeeplab import benchmarks

    path = pathlib.Path(benchmarks.__file__).resolve().parent / name
    return path if path.exists() else None


def synthetic_set(lesson, n_train, n_val, size, seed):
    """The root of a synthetic VOC-layout set for a lesson, in the output folder under a name
    made of its settings (``data_05_120x30_96px_seed5``), so that a fast run's small set is
    never mistaken for the full one; generated once, kept between runs."""
    from tinydeeplab import data

    root = os.path.join(output_dir(), f"data_{lesson}_{n_train}x{n_val}_{size}px_seed{seed}")
    if not os.path.exists(os.path.join(root, "classes.txt")):  # (written last: complete)
        data.make_synthetic_voc(root, n_train=n_train, n_val=n_val, size=size, seed=seed)
    return root


def paired_verdict(gap, first, second):
    """What per-seed differences ``gap`` (``first`` − ``second``, both runs of a seed from the
    same start and batches) can say: a side ahead only when the mean gap exceeds its spread
    over seeds."""
    import numpy as np

    gap = np.asarray(gap, float)
    if gap.size < 2:
        return "one seed: no spread to judge by"
    if gap.mean() > gap.std():
        return f"{first} ahead by more than the seeds' spread"
    if gap.mean() < -gap.std():
        return f"{second} ahead by more than the seeds' spread"
    return "within the seeds' spread: this small set cannot show a difference"


def train_run(root, name, **settings):
    """One training run of a lesson's experiment: a fresh ``name`` folder in the output folder,
    ``train.TrainConfig(root, ..., **settings)`` (no progress bar, no log lines, no
    intermediate checkpoints).  Returns (the trained model, the run's history)."""
    import shutil

    from tinydeeplab.train import TrainConfig, train

    run_dir = os.path.join(output_dir(), name)
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time
    cfg = TrainConfig(root, run_dir, checkpoint_every=10**6, **settings)
    return train(cfg, log=lambda line: None, progress=False)


def train_and_score(root, name, val, **settings):
    """``train_run``, then the plain val mIoU.  Returns (mIoU, the run's history)."""
    from tinydeeplab.evaluate import evaluate

    model, history = train_run(root, name, **settings)
    return evaluate(model, val)["plain"]["miou"], history


def photograph():
    """The launch-pad photograph shipped with the package and its annotation.

    Returns ``(image, labels, names)``: the RGB image (427×640 uint8), the labels (0 sky,
    1 rocket, 2 tower, 255 void: unsure pixels and the unannotated rows below the horizon) and
    the class names.  Source, licence and how the annotation was made:
    ``tinydeeplab/photos/README.md``.
    """
    from tinydeeplab import data

    folder = pathlib.Path(__file__).resolve().parent / "photos"
    image = data.read_image(str(folder / "rocket.jpg"))
    labels = data.read_mask(str(folder / "rocket_labels.png"), 3)
    return image, labels, ("sky", "rocket", "tower")


def gpu_or_simulator():
    """True where CuPy sees a CUDA GPU.  Otherwise switch on Numba's CUDA simulator (every
    thread a Python thread, NumPy arrays) so that a lesson's CUDA kernels run on the CPU, and
    return False.  Call it before anything imports ``numba.cuda``."""
    import sys

    from tinydeeplab.backend import cuda_simulator, has_cuda

    if has_cuda():
        return True
    if "numba.cuda" in sys.modules and not cuda_simulator():
        raise RuntimeError("numba.cuda was imported before the lesson could switch on the "
                           "CUDA simulator: restart the kernel (or Python) and run the lesson "
                           "from its first cell")
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # read by numba.cuda when it is first imported
    import numba

    numba.config.ENABLE_CUDASIM = True  # (numba read its environment when it was imported)
    return False
