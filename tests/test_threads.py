"""The thread set-up of tinydeeplab/_threads.py, each case in a fresh interpreter (it acts once,
at import): which Numba layer runs, that the environment is left as it was, that the user's own
choice wins, and that the layer does not change a single bit of the results."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

PROBE = r"""
import os, sys, json
{before}
import tinydeeplab
import numpy as np
import numba
from tinydeeplab.kernels import atrous_conv
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 5, 13, 11)).astype(np.float32)
w = rng.standard_normal((7, 5, 3, 3)).astype(np.float32)
y = atrous_conv.conv2d_forward(x, w, None, 1, 2, 2)
dx, dw, db = atrous_conv.conv2d_backward(x, w, np.ones_like(y), 1, 2, 2)
np.savez(sys.argv[1], y=y, dx=dx, dw=dw)
print(json.dumps({{"layer": numba.threading_layer(),
                  "env": {{k: os.environ.get(k) for k in ("OPENBLAS_THREAD_TIMEOUT",)}},
                  "describe": tinydeeplab._threads.describe(),
                  "spin": tinydeeplab._threads.blas_workers_spin()}}))
"""


def probe(tmp_path, name, before="", **env):
    """Run PROBE in a new interpreter; its report and its arrays."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("NUMBA_THREADING_LAYER", "OPENBLAS_THREAD_TIMEOUT")}
    environ.update(env)
    out = tmp_path / f"{name}.npz"
    done = subprocess.run([sys.executable, "-c", PROBE.format(before=before), str(out)],
                          env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), np.load(out)


def test_layers_chosen_environment_restored_and_results_identical(tmp_path):
    first, arrays_first = probe(tmp_path, "tinydeeplab_first")
    after_numpy, arrays_after = probe(tmp_path, "numpy_first", before="import numpy")
    # OpenBLAS's variable is set only while NumPy loads: afterwards the environment is the
    # user's again.
    assert first["env"] == after_numpy["env"] == {"OPENBLAS_THREAD_TIMEOUT": None}
    # NumPy imported first: OpenBLAS's workers spin (and describe() says so); the Numba
    # layer is the same either way (tinydeeplab/_threads.py has the measurements)
    assert "OpenBLAS workers spin (NumPy imported first)" in after_numpy["describe"]
    assert "OpenBLAS workers sleep" in first["describe"]
    assert after_numpy["spin"] and not first["spin"]
    assert after_numpy["layer"] == first["layer"], (first, after_numpy)
    if first["layer"] != "tbb":  # where the tbb package is missing: say so, then still compare
        print(f"Numba's TBB layer did not load here ({first['describe']}); "
              f"checked {first['layer']} instead")
        assert "tbb package is not installed" in first["describe"], first
    assert first["layer"] in ("tbb", "workqueue")
    # bit for bit against the other layer: the layer only decides who runs which rows
    other = "workqueue" if first["layer"] == "tbb" else "omp"
    report, arrays_other = probe(tmp_path, "other_layer", NUMBA_THREADING_LAYER=other)
    assert report["layer"] == other, report
    for arrays in (arrays_after, arrays_other):
        for name in ("y", "dx", "dw"):
            np.testing.assert_array_equal(arrays_first[name], arrays[name], err_msg=name)


def test_the_users_own_settings_win(tmp_path):
    report, _ = probe(tmp_path, "user_layer", NUMBA_THREADING_LAYER="workqueue",
                      OPENBLAS_THREAD_TIMEOUT="28")
    assert report["layer"] == "workqueue"
    assert report["env"]["OPENBLAS_THREAD_TIMEOUT"] == "28"  # left alone
    assert "your NUMBA_THREADING_LAYER" in report["describe"]
    assert "OPENBLAS_THREAD_TIMEOUT=28" in report["describe"]


@pytest.mark.parametrize("spinning", [True, False])
def test_train_says_when_blas_threads_spin(tmp_path, monkeypatch, spinning):
    """A script that imported NumPy first trains up to ~2x slower: train() says why and how
    to avoid it, and says nothing otherwise."""
    from tinydeeplab import _threads, data
    from tinydeeplab.train import TrainConfig, train

    monkeypatch.setattr(_threads, "BLAS_WORKERS_SLEEP", not spinning)
    root = data.make_synthetic_voc(str(tmp_path / "set"), n_train=2, n_val=1, size=40, seed=1)
    messages = []
    train(TrainConfig(root, str(tmp_path / "run"), crop=33, batch_size=2, iterations=1),
          log=messages.append, progress=False)
    noted = [m for m in messages if "import tinydeeplab before NumPy" in m]
    assert len(noted) == (1 if spinning else 0), messages


FORK = r"""
import multiprocessing as mp
import tinydeeplab
import numpy as np
from tinydeeplab.kernels import atrous_conv
x = np.ones((1, 3, 9, 9), np.float32)
w = np.ones((2, 3, 3, 3), np.float32)
parent = float(atrous_conv.conv2d_forward(x, w, None, 1, 1, 1).sum())  # the pool is running

def child(q):
    q.put(float(atrous_conv.conv2d_forward(x, w, None, 1, 1, 1).sum()))

ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
p.join(120)
print(p.exitcode, parent, q.get(timeout=10) if p.exitcode == 0 else None)
"""


def test_a_forked_child_can_run_the_kernels():
    """multiprocessing's default on Linux forks the process.  GNU OpenMP would kill a child
    that runs a parallel loop after its parent did (which is why _threads never picks it);
    the chosen layer must let the child work."""
    if not hasattr(os, "fork"):
        print("no fork() on this platform: nothing to check")
        return
    done = subprocess.run([sys.executable, "-c", FORK], capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items()
                                            if k != "NUMBA_THREADING_LAYER"})
    assert done.returncode == 0, done.stderr[-3000:]
    code, parent, child = done.stdout.split()
    assert code == "0", done.stderr[-3000:]
    # all ones, 3×3 taps over a zero-padded 9×9 plane: 25 × 25 taps × 3 channels × 2 filters
    assert float(parent) == float(child) == 25 * 25 * 3 * 2, done.stdout


def test_load_adapter_gives_up_the_cores_other_processes_hold(monkeypatch):
    """Under load the training loop used to collapse (2 competing processes on 2 cores:
    11× slower, benchmarks/under_load.py): the adapter now matches the worker threads to the
    cores left free, and gives them back when the others stop."""
    import numba
    from threadpoolctl import threadpool_info

    from tinydeeplab._threads import LoadAdapter

    if min(len(os.sched_getaffinity(0)), numba.config.NUMBA_NUM_THREADS) < 2:
        pytest.skip("one core: there are no threads to give up")
    monkeypatch.setenv("TDL_ADAPT_THREADS", "1")  # (conftest turns it off for other tests)
    state = {"t": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(LoadAdapter, "_busy", staticmethod(lambda: state["busy"]))
    monkeypatch.setattr(LoadAdapter, "_own", staticmethod(lambda: state["own"]))
    adapter = LoadAdapter()
    adapter._clock = lambda: state["t"]
    adapter._last = (0.0, 0.0, 0.0)
    cores = adapter.cores

    def second(others, ours=1.0):
        state["t"] += 1.0
        state["own"] += ours
        state["busy"] += ours + others
        return adapter.update()

    try:
        assert second(0.1) == cores  # alone: every core
        assert second(1.0) == cores  # one reading of load: not yet
        assert second(0.1) == cores  # a burst: nothing changed
        assert second(1.0) == cores and second(1.0) == cores - 1  # sustained: one core less
        assert numba.get_num_threads() == cores - 1
        blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        assert blas and all(n == cores - 1 for n in blas)
        second(cores + 3.0)
        assert second(cores + 3.0) == 1  # never below one
        state["t"] += 0.5
        assert adapter.update() == 1  # at most once a second
        second(0.0)
        assert second(0.0) == cores  # the others stopped
    finally:
        adapter.close()
    assert numba.get_num_threads() == cores
    monkeypatch.setenv("TDL_ADAPT_THREADS", "0")
    assert not LoadAdapter().enabled
