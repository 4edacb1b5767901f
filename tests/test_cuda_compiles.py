"""Every CUDA kernel compiles with the real CUDA compiler, not only runs under the simulator.

Without a GPU the CUDA kernels run under Numba's simulator, which executes them as Python: it
accepts code the CUDA compiler rejects.  (It did: a local array sized by ``D_MAX + 1`` ran in
every simulator test, and failed with a TypingError on the first real GPU, where only a
compile-time constant will do.)  Numba can compile a kernel to PTX with no GPU, given the CUDA
toolkit's NVVM and NVRTC.  This test launches every kernel once under the simulator on tiny
inputs, records the argument types of each launch, and compiles each kernel for those types for
sm_90 (Hopper) in a separate process without the simulator.  It skips, saying why, where the
compilers are missing; on a GPU machine it is not needed (every CUDA test compiles there).
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import CUDA_MODE

pytestmark = pytest.mark.skipif(CUDA_MODE != "simulator",
                                reason="a GPU is present: the CUDA tests compile every kernel")

COMPILE = textwrap.dedent("""
    import importlib, json, sys, warnings
    import numpy as np
    from numba import cuda, types
    import numba.cuda.dispatcher as dispatcher

    warnings.simplefilter("ignore")

    class Hopper:  # device functions ask the current device for its compute capability
        compute_capability = (9, 0)

    dispatcher.get_current_device = lambda: Hopper()

    def numba_type(name):
        if name.startswith("array("):
            dtype, ndim, layout = [p.strip() for p in name[6:-1].split(",")]
            return types.Array(getattr(types, dtype), int(ndim[:-1]), layout)
        return types.boolean if name == "bool" else getattr(types, name)

    failures, bounds = [], {}
    for module, name, dtype, argtypes in json.load(sys.stdin):
        m = importlib.import_module(module)
        if "<locals>" in name:  # the tiled kernels are made per dtype by a factory
            factory, inner = name.split(".<locals>.")
            made = getattr(m, factory)(np.dtype(dtype))
            fn = next(k for k in made if k.py_func.__name__ == inner)
        else:
            fn = getattr(m, name)
        try:  # with the launch bounds the kernel was declared with, as on a GPU
            ptx, _ = cuda.compile_ptx(fn.py_func, tuple(numba_type(a) for a in argtypes),
                                      cc=(9, 0),
                                      launch_bounds=fn.targetoptions.get("launch_bounds"))
            bounds[name] = [line.split() for line in ptx.splitlines()
                            if line.strip().startswith((".maxntid", ".minnctapersm"))]
        except Exception as error:
            failures.append(f"{module}.{name}{tuple(argtypes)}: {type(error).__name__}: "
                            + str(error).strip().splitlines()[0])
    print(json.dumps([failures, bounds]))
""")


def record_launches(workload):
    """[(module, kernel name, dtype of the first array, argument type names)] of every kernel
    launch ``workload`` makes under the simulator."""
    import numba
    from numba.cuda.simulator import kernel as simulated

    seen = set()
    original = simulated.FakeCUDAKernel.__call__

    def call(self, *args):
        if not (self._device or simulated._kernel_context):  # a launch, not a device call
            dtypes = [a.dtype.name for a in args if isinstance(a, np.ndarray)]
            seen.add((self.fn.__module__, self.fn.__qualname__, dtypes[0] if dtypes else "",
                      tuple(str(numba.typeof(a)) for a in args)))
        return original(self, *args)

    simulated.FakeCUDAKernel.__call__ = call
    try:
        workload()
    finally:
        simulated.FakeCUDAKernel.__call__ = original
    return sorted(seen)


def every_kernel(monkeypatch):
    """Launch each CUDA kernel at least once, float32 and float64, tiny shapes."""
    from tinydeeplab import crf
    from tinydeeplab.kernels import atrous_conv
    from tinydeeplab.kernels import batch_norm as bn
    from tinydeeplab.kernels import batch_norm_cuda, bilinear, max_pool
    from tinydeeplab.kernels.permutohedral import cuda as permutohedral_cuda
    from tinydeeplab.kernels.softmax import softmax_rows

    # every simulated thread is a Python thread, and batch norm's blocks of 128 cost ~8 s a
    # dtype; only the argument types are recorded here (the compile below, in another
    # process, sees the module's own block size), so blocks of 4 do
    monkeypatch.setattr(batch_norm_cuda, "THREADS", 4)
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        x = rng.standard_normal((1, 2, 5, 4)).astype(dt)  # the simulator runs every thread
        w = rng.standard_normal((2, 2, 3, 3)).astype(dt)  # as a Python thread: keep it small
        dy = rng.standard_normal((1, 2, 5, 4)).astype(dt)
        for variant, spec in atrous_conv.VARIANTS.items():
            if spec.device == "cuda":
                atrous_conv.conv2d_forward(x, w, np.zeros(2, dt), 1, 2, 2, variant=variant)
                atrous_conv.conv2d_backward(x, w, dy, 1, 2, 2, variant=variant)
                atrous_conv.conv2d_backward(x, w, dy, 1, 2, 2, variant=variant, need_dx=False)
        y, argmax = max_pool.max_pool2d_forward(x, 3, 2, 1, True, variant="cuda_v1")
        max_pool.max_pool2d_backward(np.ones_like(y), argmax, x.shape, 3, 2, 1,
                                     variant="cuda_v1")
        bilinear.bilinear_forward(x, (7, 6), variant="cuda_v1")
        bilinear.bilinear_backward(np.ones((1, 2, 7, 6), dt), x.shape, variant="cuda_v1")
        ones, zeros = np.ones(2, dt), np.zeros(2, dt)
        for training in (True, False):
            y, saved = bn.batch_norm_forward(x, zeros.copy(), ones.copy(), ones, zeros,
                                             training, relu=True, variant="cuda_v1")
            bn.batch_norm_backward(np.ones_like(x), x, y, saved, ones, training, relu=True,
                                   variant="cuda_v1")
            y, saved = bn.batch_norm_forward(x, zeros.copy(), ones.copy(), ones, zeros,
                                             training, relu=True, variant="cuda_v1",
                                             residual=dy)
            bn.batch_norm_backward(np.ones_like(x), x, y, saved, ones, training, relu=True,
                                   variant="cuda_v1", residual=True)
        softmax_rows(x.reshape(-1, 4), np.empty_like(x.reshape(-1, 4)), cuda=True)
        features = (rng.random((30, 5)) * 2).astype(np.float32)
        lattice = crf.PermutohedralLattice(features, device="cuda")
        lattice.filter(rng.random((30, 2)).astype(dt), reverse=True)
        lattice.kernel.splat(rng.random((30, 2)).astype(dt))
        lattice.kernel.blur(one_launch=False)  # one launch per direction
    image = rng.integers(0, 256, (5, 6, 3)).astype(np.uint8)
    probs = rng.dirichlet(np.ones(3), (5, 6)).transpose(2, 0, 1).astype(np.float32)
    monkeypatch.setattr(permutohedral_cuda, "SPLAT_CHUNK", 2)  # the two-step splat too
    crf.dense_crf(image, probs, iterations=2, device="cuda")


def test_every_cuda_kernel_compiles_for_a_real_gpu(monkeypatch):
    launches = record_launches(lambda: every_kernel(monkeypatch))
    names = {name for _, name, _, _ in launches}
    assert len(names) >= 20, f"too few kernels launched: {sorted(names)}"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    probe = subprocess.run(
        [sys.executable, "-c", "from numba.cuda.cudadrv import nvvm; nvvm.NVVM();"
         "from cuda.bindings import nvrtc; nvrtc.nvrtcVersion()"],
        env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("no CUDA compilers to compile with (NVVM from the CUDA toolkit and NVRTC, "
                    "pip package nvidia-cuda-nvrtc): "
                    + (probe.stderr.strip().splitlines() or ["?"])[-1])
    done = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(launches), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    failures, bounds = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
    # the one-launch mean field's register cap (cuda_mean_field.MEAN_FIELD_BLOCKS_PER_SM)
    # reaches the compiled code: PTX directives .maxntid 128 and .minnctapersm 8
    from tinydeeplab.kernels import _common
    from tinydeeplab.kernels.permutohedral import cuda_mean_field

    directives = {words[0]: words[1].rstrip(",") for words in bounds["_mean_field_kernel"]}
    assert directives == {".maxntid": str(_common.THREADS),
                          ".minnctapersm": str(cuda_mean_field.MEAN_FIELD_BLOCKS_PER_SM)}, \
        bounds["_mean_field_kernel"]
