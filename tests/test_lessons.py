"""Every lesson runs top to bottom (TDL_FAST=1) and its Check cell passes."""
import os
import pathlib
import subprocess
import sys

import pytest

LESSONS = sorted((pathlib.Path(__file__).resolve().parents[1] / "lessons").glob("[0-9]*.py"))


def test_there_are_lessons():
    assert LESSONS, "lessons/ holds no NN_topic.py files"


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_and_checks(path):
    env = {**os.environ, "TDL_FAST": "1", "MPLBACKEND": "Agg"}
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # lessons run the CPU kernels
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "Check passed." in out.stdout
    if "TDL_FAST" in path.read_text(encoding="utf-8").split('"""', 2)[2]:  # it has a fast mode
        assert "not the lesson's results" in out.stdout, "a fast run must say it is a smoke test"
