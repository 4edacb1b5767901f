"""Every lesson runs top to bottom (TDL_FAST=1) the way a notebook runs it, and its Check cell
passes: its source executed in one namespace, as a notebook runs its cells: no ``__file__``,
another working directory — so it may not rely on its own path, and writes only to
./lesson_out there (or $TDL_OUT), never into the source tree."""
import os
import pathlib
import subprocess
import sys

import pytest

LESSON_DIR = pathlib.Path(__file__).resolve().parents[1] / "lessons"
LESSONS = sorted(LESSON_DIR.glob("[0-9]*.py"))

# what a notebook kernel does with the cells: one namespace, no __file__
AS_NOTEBOOK = ("import sys; source = open(sys.argv[1], encoding='utf-8').read(); "
               "exec(compile(source, '<notebook>', 'exec'), {'__name__': '__main__'})")


def test_there_are_lessons():
    assert LESSONS, "lessons/ holds no NN_topic.py files"


def snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_as_a_notebook_and_checks(path, tmp_path):
    env = {**os.environ, "TDL_FAST": "1", "MPLBACKEND": "Agg"}
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # lessons run the CPU kernels
    env.pop("TDL_OUT", None)
    before = snapshot(LESSON_DIR)
    out = subprocess.run([sys.executable, "-c", AS_NOTEBOOK, str(path)], capture_output=True,
                         text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "Check passed." in out.stdout
    if "TDL_FAST" in path.read_text(encoding="utf-8").split('"""', 2)[2]:  # it has a fast mode
        assert "not the lesson's results" in out.stdout, "a fast run must say it is a smoke test"
    assert snapshot(LESSON_DIR) == before, "a lesson wrote into the source tree"
    written = list((tmp_path / "lesson_out").rglob("*"))
    if "savefig" in path.read_text(encoding="utf-8"):
        assert any(p.suffix == ".png" for p in written), "its figure went elsewhere"


def test_lessons_write_to_TDL_OUT_when_set(tmp_path):
    env = {**os.environ, "TDL_OUT": str(tmp_path / "figures"), "MPLBACKEND": "Agg"}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    lesson = LESSON_DIR / "10_limits_thin_structures.py"
    out = subprocess.run([sys.executable, "-c", AS_NOTEBOOK, str(lesson)], capture_output=True,
                         text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "figures").glob("*.png")) and not (tmp_path / "lesson_out").exists()
