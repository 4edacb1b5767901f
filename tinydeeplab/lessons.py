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
