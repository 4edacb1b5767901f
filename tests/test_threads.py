"""The thread set-up of tinydeeplab/_threads.py, each case in a fresh interpreter (it acts once,
at import): which Numba layer runs, that the environment is left as it was, that the user's own
choice wins, and that the layer does not change a single bit of the results."""
import json
import os
import subprocess
import sys

import numpy as np

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
                  "env": {{k: os.environ.get(k) for k in ("OPENBLAS_THREAD_TIMEOUT",
                                                           "GOMP_SPINCOUNT")}},
                  "describe": tinydeeplab._threads.describe()}}))
"""


def probe(tmp_path, name, before="", **env):
    """Run PROBE in a new interpreter; its report and its arrays."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("NUMBA_THREADING_LAYER", "OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT",
                            "OMP_WAIT_POLICY")}
    environ.update(env)
    out = tmp_path / f"{name}.npz"
    done = subprocess.run([sys.executable, "-c", PROBE.format(before=before), str(out)],
                          env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), np.load(out)


def test_layers_chosen_environment_restored_and_results_identical(tmp_path):
    first, arrays_first = probe(tmp_path, "tinydeeplab_first")
    after_numpy, arrays_after = probe(tmp_path, "numpy_first", before="import numpy")
    # OpenBLAS's variable is set only while NumPy loads and GOMP_SPINCOUNT only while Numba
    # loads its OpenMP runtime: afterwards the environment is the user's again.
    assert first["env"] == after_numpy["env"] == {"OPENBLAS_THREAD_TIMEOUT": None,
                                                   "GOMP_SPINCOUNT": None}
    # NumPy imported first: OpenBLAS already spins, so the never-spinning workqueue layer.
    assert after_numpy["layer"] == "workqueue", after_numpy
    assert "NumPy was imported before tinydeeplab" in after_numpy["describe"]
    if first["layer"] != "omp":  # only where GNU OpenMP is missing: say so, then still compare
        print(f"Numba's OpenMP layer did not load here; fell back to {first['layer']}")
    assert first["layer"] in ("omp", "workqueue", "tbb")
    assert "OpenBLAS workers sleep" in first["describe"]
    for name in ("y", "dx", "dw"):  # bit for bit: the layer only decides who runs which rows
        np.testing.assert_array_equal(arrays_first[name], arrays_after[name], err_msg=name)


def test_the_users_own_settings_win(tmp_path):
    report, _ = probe(tmp_path, "user_layer", NUMBA_THREADING_LAYER="workqueue",
                      OPENBLAS_THREAD_TIMEOUT="28")
    assert report["layer"] == "workqueue"
    assert report["env"]["OPENBLAS_THREAD_TIMEOUT"] == "28"  # left alone
    assert "your NUMBA_THREADING_LAYER" in report["describe"]
    assert "OPENBLAS_THREAD_TIMEOUT=28" in report["describe"]
    if sys.platform.startswith("linux"):
        report, _ = probe(tmp_path, "user_spin", GOMP_SPINCOUNT="77")
        assert report["env"]["GOMP_SPINCOUNT"] == "77"
        assert "GOMP_SPINCOUNT=10000" not in report["describe"]
