"""The convolution benchmark runs on a small shape, and the benchmarks say how busy the host was."""
import io
import os

import pytest

from tinydeeplab.benchmarks import cpu_ticks, steal_line


def test_cpu_ticks_reads_the_first_line_of_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 20 800 10 0 3 62 0 0\ncpu0 50 2 10 400 5 0 1 31 0 0\n")
    assert cpu_ticks(str(stat)) == [100, 5, 20, 800, 10, 0, 3, 62]
    stat.write_text("intr 1 2 3\n")
    assert cpu_ticks(str(stat)) is None  # not the format it knows: no figure, no guess
    assert cpu_ticks(str(tmp_path / "absent")) is None  # not Linux


def test_steal_line_gives_the_share_of_time_taken_by_other_machines():
    start = [100, 0, 20, 800, 10, 0, 0, 70]
    end = [400, 0, 40, 900, 10, 0, 0, 170]  # 300 + 20 + 100 idle + 100 steal = 520 ticks
    line = steal_line(start, end)
    assert line.startswith("# host: 19 % of the CPU time"), line  # 100 / 520
    assert "idle 19 %" in line
    assert steal_line(None, end) == ""  # no reading at the start (not Linux)
    assert steal_line(start, start) == ""  # no time passed: nothing to say


def test_conv_benchmark_runs_and_reports_the_host():
    pytest.importorskip("torch", reason="the benchmark compares with PyTorch")
    from tinydeeplab.benchmarks import bench_conv

    out = io.StringIO()
    ratios = bench_conv.run("cpu", threads=1, repeat=1, rounds=1, out=out,
                            shapes=[((1, 3, 9, 7), 2, 3, 2)], against="cpu_v3")
    text = out.getvalue()
    assert len(ratios) == 1 and ratios[0] > 0
    assert "| (1, 3, 9, 7) | 2 | 3×3 | 2 |" in text, text
    assert "median ratio ours/torch" in text
    if os.path.isfile("/proc/stat"):
        assert "# host: " in text and "steal" in text, text


def test_aspp_benchmark_runs_and_reports_the_host():
    pytest.importorskip("torch", reason="the benchmark compares with PyTorch")
    from tinydeeplab.benchmarks import bench_aspp

    out = io.StringIO()
    results = bench_aspp.run(threads=1, repeat=1, rounds=1, out=out,
                             shapes=[((2, 5, 9, 7), 3)])
    text = out.getvalue()
    assert len(results) == 1 and all(r > 0 for r in results[0])
    assert "| (2, 5, 9, 7) | 3 |" in text, text
    if os.path.isfile("/proc/stat"):
        assert "# host: " in text and "steal" in text, text


def test_conv_rules_benchmark_runs_and_finds_the_same_columns(monkeypatch):
    from tinydeeplab.benchmarks import bench_conv_rules
    from tinydeeplab.kernels import atrous_conv

    monkeypatch.setattr(atrous_conv, "WINOGRAD_CL_MIN_TILES", 0)  # a small map's 16 tiles
    out = io.StringIO()
    results = bench_conv_rules.run(threads=1, repeat=1, rounds=1, out=out,
                                   winograd_shapes=[((1, 2, 8, 8), 3, 1), ((1, 2, 3, 3), 2, 4)],
                                   im2col_shapes=[((2, 3, 11, 9), 4, 5, 2, 2)],
                                   direct_shapes=[((1, 3, 13, 15), 16, 3, 1, 2),
                                                  ((1, 70, 9, 9), 16, 3, 1, 1)],
                                   split_shapes=[])
    text = out.getvalue()
    assert len(results["winograd"]) == 1 and results["winograd"][0][2] > 0  # forced: ran
    assert results["winograd"][0][1] is False  # 0.0007 GFLOP: not the library's choice
    assert "| (1, 2, 3, 3) | 2 | 4 |" in text and "not Winograd's shape" in text, text
    assert results["im2col"] == [(True, results["im2col"][0][1])], results
    assert "| (2, 3, 11, 9) | 5×5 | 2 | yes |" in text, text
    assert [rule for rule, _, _ in results["direct"]] == [True, False]  # 27 and 630 taps
    assert all(ratio > 0 for _, _, ratio in results["direct"])
    assert "| (1, 3, 13, 15) | 16 | 3×3 | 1 | 2 | 27 | yes |" in text, text


def test_conv_rules_benchmark_times_the_split_gemm_batches(monkeypatch):
    from tinydeeplab.benchmarks import bench_conv_rules
    from tinydeeplab.kernels import _gemm_batch, atrous_conv

    for name, floor in (("WINOGRAD_CL_MIN_TILES", 0), ("WINOGRAD_MIN_CHANNELS", 1),
                        ("WINOGRAD_CL_MIN_FLOPS", 0)):  # a small layer takes Winograd
        monkeypatch.setattr(atrous_conv, name, floor)
    calls = []
    real = _gemm_batch.matmul_batch
    monkeypatch.setattr(_gemm_batch, "matmul_batch",
                        lambda *a: calls.append(_gemm_batch.SPLIT) or real(*a))
    from tinydeeplab.kernels import atrous_conv_winograd

    monkeypatch.setattr(atrous_conv_winograd, "matmul_batch", _gemm_batch.matmul_batch)
    out = io.StringIO()
    results = bench_conv_rules.run(threads=1, repeat=1, rounds=1, out=out, winograd_shapes=[],
                                   im2col_shapes=[], direct_shapes=[],
                                   split_shapes=[((1, 2, 8, 8), 3, 1), ((1, 5, 12, 11), 4, 2)])
    text = out.getvalue()
    assert [takes for takes, _ in results["split"]] == [True, True], results
    assert all(ratio > 0 for _, ratio in results["split"])
    assert "| (1, 5, 12, 11) | 4 | 2 | yes |" in text, text
    assert True in calls and False in calls  # both sides ran through the batch GEMMs
    assert _gemm_batch.SPLIT is True  # and the switch was put back


@pytest.mark.parametrize("name", ["bench_conv", "bench_model", "bench_aspp", "bench_conv_rules",
                                  "bench_batch_norm"])
def test_benchmarks_refuse_a_zero_count_before_timing(name, capsys):
    import importlib

    module = importlib.import_module(f"tinydeeplab.benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--rounds", "0"])
    assert exit_info.value.code != 0
    assert "expected a positive whole number, got 0" in capsys.readouterr().err
