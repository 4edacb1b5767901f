"""The CRF's benchmark and profiling scripts run, on tiny scenes, without the shared data."""
import numpy as np
import pytest

from crf_helpers import EXAMPLES

from tinydeeplab import crf


def test_profile_script_runs_on_the_cpu():
    """benchmarks/profile_crf.py (where the CRF's time goes) runs, step by step, on a tiny
    scene: each step timed, the steps adding up to the whole."""
    import io

    from tinydeeplab.benchmarks import profile_crf

    out = io.StringIO()
    profile_crf.run("cpu", repeat=1, size=(20, 24), out=out)
    text = out.getvalue()
    for step in ("unary", "spatial lattice + normalisation",
                 "bilateral lattice + normalisation", "10 iterations", "all (each step"):
        assert text.count(f"| {step}") == 2, text  # once per parameter set
    for ab in ("spatial message in one sweep", "two splats in one pass"):
        assert text.count(ab) == 2, text  # the CPU's A/Bs, per parameter set


@pytest.mark.parametrize("script", ["bench_crf", "profile_crf", "crf_parts", "sweep_mean_field"])
def test_crf_benchmarks_start_without_the_shared_photograph(monkeypatch, tmp_path, script):
    """Without ../shared (an installed package, the GPU machine) the CRF benchmarks run on the
    synthetic scene: their --image defaults to None (argparse would check a path default and
    stop with 'no such file'); a given path that is missing is still a clear error first."""
    import argparse
    import importlib

    from tinydeeplab.benchmarks import bench_crf

    module = importlib.import_module(f"tinydeeplab.benchmarks.{script}")
    monkeypatch.setattr(bench_crf, "PHOTO", str(tmp_path / "absent.png"))
    seen = {}
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, argv=None, namespace=None):  # stop right after parsing
        seen["args"] = real(self, argv, namespace)
        raise SystemExit("parsed")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    with pytest.raises(SystemExit, match="parsed"):
        module.main([])
    assert seen["args"].image is None
    with pytest.raises(SystemExit) as stop:
        module.main(["--image", str(tmp_path / "missing.png")])
    assert stop.value.code == 2  # argparse's error (no such file), not the end of parsing


def test_crf_parts_script_runs_on_the_cpu():
    """benchmarks/crf_parts.py (the CPU CRF's parts against what they replaced, in turns)
    runs on a tiny scene and reports each A/B with results that agree."""
    import io
    import re

    from tinydeeplab.benchmarks import crf_parts

    out = io.StringIO()
    crf_parts.run(repeat=1, size=(20, 24), out=out)
    text = out.getvalue()
    for ab in ("spatial filter: one sweep", "spatial filter (transposed): one sweep",
               "in registers", "radix sort of the spatial", "radix sort of the bilateral"):
        assert ab in text, text
    for delta in re.findall(r"max \|Δ\| ([0-9.e+-]+)", text):
        assert float(delta) < 1e-5, text


def test_benchmark_scene_says_which_image_it_is(tmp_path):
    """bench_crf / profile_crf run on the photograph when it is there, else on a synthetic
    scene whose lattice is several times larger: the scene's name must say which."""
    from PIL import Image

    from tinydeeplab.benchmarks import bench_crf

    photo = np.random.default_rng(0).integers(0, 256, (30, 40, 3)).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "p.png")
    image, probs, scene = bench_crf.make_scene(15, 20, C=4, photo=str(tmp_path / "p.png"))
    assert scene == "photograph p.png"
    np.testing.assert_array_equal(image, np.array(Image.fromarray(photo).resize((20, 15))))
    assert probs.shape == (4, 15, 20) and np.allclose(probs.sum(0), 1, atol=1e-6)
    _, _, scene = bench_crf.make_scene(15, 20, C=4, photo=str(tmp_path / "none.png"))
    assert scene.startswith("synthetic") and "none.png not found" in scene
    image, _, scene = bench_crf.make_scene(15, 20, C=4, photo=None)
    assert scene == "synthetic textured scene" and image.shape == (15, 20, 3)
