"""The CUDA lattice and mean field (kernels/permutohedral/cuda*.py) against the CPU: on a GPU
when CuPy sees one, else under Numba's CUDA simulator on tiny inputs."""
import numpy as np
import pytest

from conftest import on_device, to_numpy
from crf_helpers import synthetic_scene

from tinydeeplab import crf


@pytest.mark.parametrize("d", [1, 2, 5])
def test_cuda_lattice_equals_cpu(d):
    rng = np.random.default_rng(d)
    f = (rng.random((40, d)) * 3).astype(np.float32)
    v = rng.random((40, 3)).astype(np.float32)
    cpu = crf.PermutohedralLattice(f, device="cpu")
    gpu = crf.PermutohedralLattice(f, device="cuda")
    assert cpu.num_vertices == gpu.num_vertices
    for reverse in (False, True):
        out = gpu.filter(v, reverse=reverse)
        out = out.get() if hasattr(out, "get") else out
        np.testing.assert_allclose(out, cpu.filter(v, reverse=reverse), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_lattice_steps_in_order(device):
    """splat, blur, slice one at a time equal filter; a blur before any splat is a clear
    error, not an AttributeError."""
    rng = np.random.default_rng(7)
    f = (rng.random((31, 3)) * 4).astype(np.float32)
    v = rng.random((31, 5)).astype(np.float32)
    lattice = crf.PermutohedralLattice(f, device=device).kernel
    v = on_device(v, device)  # the lattice's own methods take arrays where it lives
    with pytest.raises(RuntimeError, match="splat first"):
        lattice.blur()
    lattice.splat(v)
    stepped = lattice.slice(lattice.blur())
    whole = lattice.filter(v)
    get = (lambda a: a.get() if hasattr(a, "get") else a)
    np.testing.assert_array_equal(get(stepped), get(whole))


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_cuda_splat_in_chunks_equals_cpu(monkeypatch, chunk):
    """The CUDA splat sums long member lists in chunks, then the chunks' sums: with chunks
    of 1, 2 and 5 members (most vertices then need several) it still equals the CPU's."""
    from tinydeeplab.kernels.permutohedral import cuda as permutohedral_cuda

    monkeypatch.setattr(permutohedral_cuda, "SPLAT_CHUNK", chunk)
    rng = np.random.default_rng(11)
    f = (rng.random((45, 2)) * 2).astype(np.float32)  # few vertices, many members each
    v = rng.random((45, 3)).astype(np.float32)
    gpu = crf.PermutohedralLattice(f, device="cuda")
    assert int(gpu.kernel.multi.shape[0]) > 0  # the two-step path ran
    out = to_numpy(gpu.filter(v))
    np.testing.assert_allclose(out, crf.PermutohedralLattice(f, device="cpu").filter(v),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_blur_in_one_launch_equals_one_launch_per_direction(monkeypatch, reverse):
    """The blur's d+1 passes in one launch (a grid-wide barrier between them) equal one launch
    per pass, the fallback where no grid barrier is available."""
    from tinydeeplab.kernels.permutohedral import cuda as permutohedral_cuda

    rng = np.random.default_rng(12)
    f = (rng.random((37, 3)) * 3).astype(np.float32)
    v = on_device(rng.random((37, 4)).astype(np.float32), "cuda")
    lattice = crf.PermutohedralLattice(f, device="cuda").kernel
    together = to_numpy(lattice.filter(v, reverse))
    assert any(blocks > 0 for (kernel, dtype, _), blocks in
               permutohedral_cuda._COOPERATIVE_BLOCKS.items()
               if kernel is permutohedral_cuda._blur_all_kernel and dtype == "float32"), \
        "the one-launch blur did not run"
    lattice.splat(v)
    apart = to_numpy(lattice.slice(lattice.blur(reverse, one_launch=False)))
    np.testing.assert_allclose(together, apart, rtol=1e-6, atol=1e-7)


def test_cuda_packed_sort_keys_order_as_lexsort():
    """The CUDA build sorts the vertex keys as one int64 each when their ranges allow: the
    same stable order as a lexicographic sort of the rows; too wide a range falls back."""
    from tinydeeplab.kernels.permutohedral.cuda import _packed_keys

    rng = np.random.default_rng(3)
    keys = rng.integers(-40, 60, (500, 4)).astype(np.int32)
    keys[::7] = keys[1::7][:len(keys[::7])]  # equal rows, whose order must stay stable
    packed = _packed_keys(keys)
    np.testing.assert_array_equal(np.argsort(packed, kind="stable"), np.lexsort(keys.T[::-1]))
    wide = np.array([[-2**30] * 3, [2**30] * 3], np.int32)  # spans multiply to ~2^93
    assert _packed_keys(wide) is None
    extreme = np.array([[0, 2**31 - 1], [0, -2**31], [1, 0], [0, 5]], np.int32)  # span 2^32
    np.testing.assert_array_equal(np.argsort(_packed_keys(extreme), kind="stable"),
                                  np.lexsort(extreme.T[::-1]))


@pytest.mark.parametrize("K, d, low, high", [
    (1, 1, 0, 9), (37, 3, 5, 100), (4099, 5, -2**31, 2**31), (1500, 2, -90, -3)])
def test_cuda_key_bounds_equal_numpy(K, d, low, high):
    """The CUDA build's column bounds of the keys (a block-merged atomic reduction) equal
    NumPy's min and max: all-positive and all-negative keys, and the int32 extremes."""
    from tinydeeplab.kernels.permutohedral.cuda import _key_bounds

    rng = np.random.default_rng(K)
    keys = rng.integers(low, high, (K, d), dtype=np.int64).astype(np.int32)
    if high == 2**31:
        keys[K // 2, 0], keys[K - 1, d - 1] = 2**31 - 1, -2**31
    assert _key_bounds(on_device(keys, "cuda")) == [keys.min(0).tolist(), keys.max(0).tolist()]


def test_cuda_dense_crf_equals_cpu():
    H, W, C = 7, 9, 3
    image, probs = synthetic_scene(H, W, C, seed=3)
    q_cpu = crf.dense_crf(image, probs, iterations=3, bi_xy_std=5, bi_rgb_std=20)
    q_gpu = crf.dense_crf(image, probs, iterations=3, bi_xy_std=5, bi_rgb_std=20,
                          device="cuda")
    q_gpu = q_gpu.get() if hasattr(q_gpu, "get") else q_gpu
    np.testing.assert_allclose(q_gpu, q_cpu, atol=2e-6)


@pytest.mark.parametrize("kernels, chunk, iterations, per_launch", [
    (("gaussian", "bilateral"), 32, 3, 25),  # DeepLab's pair, short member lists
    (("gaussian", "bilateral"), 32, 3, 2),  # in two launches: 2 iterations, then 1 more
    (("gaussian", "bilateral"), 2, 2, 25),  # long lists: the chunks' sums step runs
    (("bilateral",), 3, 1, 25),  # one kernel (its lattice of 6 directions alone)
    (("gaussian", "bilateral", "line"), 2, 2, 25),  # three, of 3, 6 and 2 directions
    (("gaussian", "bilateral"), 32, 0, 25),  # the softmax of the unary only
])
def test_cuda_mean_field_in_one_launch_equals_the_plain_loop(monkeypatch, kernels, chunk,
                                                              iterations, per_launch):
    """With Potts kernels only, the CUDA inference runs as one launch (per up to
    ITERATIONS_PER_LAUNCH iterations) over the kernels' lattices side by side: the same Q as
    DenseCRF.inference's plain loop on the CUDA lattices, and the CPU's — within float32
    rounding (the engine folds the normalisation and weight into the slice's weights and
    adds the messages onto −U as it slices, where the loop multiplies and subtracts them)."""
    from tinydeeplab.kernels.permutohedral import cuda as permutohedral_cuda
    from tinydeeplab.kernels.permutohedral import cuda_mean_field

    monkeypatch.setattr(permutohedral_cuda, "SPLAT_CHUNK", chunk)
    monkeypatch.setattr(cuda_mean_field, "ITERATIONS_PER_LAUNCH", per_launch)
    H, W, C = 6, 7, 4
    image, probs = synthetic_scene(H, W, C, seed=5)
    unary = crf.unary_from_softmax(probs)
    rng = np.random.default_rng(5)
    line = (rng.random((1, H * W)) * 4).astype(np.float32)  # features of one dimension

    def run(device, engine=None):
        d = crf.DenseCRF2D(W, H, C, device=device)
        d.setUnaryEnergy(on_device(unary, device))
        for name in kernels:
            if name == "gaussian":
                d.addPairwiseGaussian(sxy=2, compat=3)
            elif name == "bilateral":
                d.addPairwiseBilateral(sxy=4, srgb=25, rgbim=image, compat=5)
            else:
                d.addPairwiseEnergy(on_device(line, device), compat=2)
        q = to_numpy(d.inference(iterations, engine))
        used = any(engine is not None for engine in d._engines.values())
        return q, used, d

    together, used, d = run("cuda")
    assert used, "the one-launch inference did not run"
    if chunk <= 3:
        assert any(p.lattice.kernel.multi.shape[0] > 0 for p in d.pairwise), \
            "no vertex has several chunks: the chunks' sums step did not run"
    apart, used, _ = run("cuda", engine="plain")
    assert not used
    np.testing.assert_allclose(together, apart, atol=2e-6, rtol=0)
    np.testing.assert_allclose(together, run("cpu")[0], atol=2e-6)


def test_mean_field_kernel_compiled_anew_gives_the_same_q():
    """cuda_mean_field.compile_kernel (the variants benchmarks/sweep_mean_field.py times)
    passed to MeanFieldCUDA(kernel=): the same Q as the default one-launch kernel, which it
    compiles from the same source with the same bounds."""
    from tinydeeplab.kernels.permutohedral import cuda_mean_field as pc

    H, W, C = 6, 7, 3
    image, probs = synthetic_scene(H, W, C, seed=2)
    d = crf.DenseCRF2D(W, H, C, device="cuda")
    d.setUnaryEnergy(on_device(crf.unary_from_softmax(probs), "cuda"))
    d.addPairwiseGaussian(sxy=2, compat=3)
    d.addPairwiseBilateral(sxy=4, srgb=25, rgbim=image, compat=5)
    expected = to_numpy(d.inference(2))
    kernel = pc.compile_kernel(pc.MEAN_FIELD_BLOCKS_PER_SM)
    engine = pc.MeanFieldCUDA.make([p.lattice.kernel for p in d.pairwise],
                                   [p.pre for p in d.pairwise], [p.post_w for p in d.pairwise],
                                   C, kernel=kernel)
    assert engine is not None and engine.kernel is kernel
    np.testing.assert_array_equal(to_numpy(engine.run(d.unary, 2)), expected)
