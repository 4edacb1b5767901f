"""Max pooling, bilinear resizing and batch norm: every variant against PyTorch (forward and
backward), finite differences through F, odd sizes, CUDA under the simulator, bad input."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinydeeplab.functional as F
from conftest import CUDA_MODE, on_device, to_numpy
from helpers import torch
from tinydeeplab import Tensor, gradcheck
from tinydeeplab.kernels import batch_norm as bn_k
from tinydeeplab.kernels import bilinear as bil_k
from tinydeeplab.kernels import max_pool as pool_k

FEW = settings(max_examples=3 if CUDA_MODE == "simulator" else 25, deadline=None)
MANY = settings(max_examples=30, deadline=None)


def settings_for(device):
    return FEW if device == "cuda" else MANY


# ---- max pooling --------------------------------------------------------------------------------
@st.composite
def pool_case(draw, small=False):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    top = 6 if small else 11
    H, W = draw(st.integers(k[0], top + k[0])), draw(st.integers(k[1], top + k[1]))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2 if small else 3)), H, W)
    x = np.random.default_rng(draw(st.integers(0, 2**16))).permutation(
        np.arange(np.prod(shape), dtype=np.float64)).reshape(shape)  # distinct: no ties
    return x, k, s, p, draw(st.booleans())


def check_pool(variant, case):
    x, k, s, p, ceil = case
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, k, s, p, ceil_mode=ceil)
    dy = np.random.default_rng(0).standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dy))
    device = pool_k.VARIANTS[variant].device
    y, am = pool_k.max_pool2d_forward(on_device(x, device), k, s, p, ceil, variant=variant)
    dx = pool_k.max_pool2d_backward(on_device(dy, device), am, x.shape, k, s, p, variant=variant)
    np.testing.assert_array_equal(to_numpy(y), yt.detach().numpy())
    np.testing.assert_allclose(to_numpy(dx), xt.grad.numpy(), atol=1e-12)


@pytest.mark.parametrize("variant", sorted(pool_k.VARIANTS))
def test_max_pool_variants_match_torch(variant):
    device = pool_k.VARIANTS[variant].device

    @settings_for(device)
    @given(case=pool_case(small=device == "cuda"))
    def run(case):
        check_pool(variant, case)

    run()


@pytest.mark.parametrize("variant", ["cpu_v1", "cpu_v2"])
def test_max_pool_caffe_stem_with_ties_takes_the_first_maximum(variant):
    x = np.zeros((1, 1, 7, 7))  # all ties: PyTorch gives each window's first element
    x[0, 0, 3, 3] = -1
    check_pool(variant, (x, (3, 3), (2, 2), (1, 1), True))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pool", [((3, 3), (2, 2), (1, 1), False), ((3, 3), (1, 1), (1, 1), True),
                                  ((2, 3), (1, 2), (1, 1), False), ((3, 2), (2, 1), (0, 1), True)])
def test_max_pool_cpu_v2_gives_cpu_v1_bits(pool, dtype):  # forward and backward
    # ties, repeated values, NaN (first in a window, and later), ±inf and signed zeros: the
    # same maxima and the same positions as cpu_v1, inside the image and at its borders
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (2, 3, 11, 10)).astype(dtype)  # many ties
    x[0, 0, :, :] = rng.standard_normal((11, 10))
    x[0, 1, 2:5, 2:5] = np.nan
    x[0, 1, 7, 7] = np.nan
    x[1, 0, 4, :] = -np.inf
    x[1, 0, 6, 3] = np.inf
    x[1, 1] = np.where(rng.random((11, 10)) < 0.5, -0.0, 0.0).astype(dtype)
    k, st_, p, ceil = pool
    y1, a1 = pool_k.max_pool2d_forward(x, k, st_, p, ceil, variant="cpu_v1")
    y2, a2 = pool_k.max_pool2d_forward(x, k, st_, p, ceil, variant="cpu_v2")
    assert np.array_equal(a1, a2)
    assert np.array_equal(y1.view(np.uint8), y2.view(np.uint8))  # bits, so -0.0 ≠ 0.0
    dy = rng.standard_normal(y1.shape).astype(dtype)  # overlapping windows share inputs
    dx1, dx2 = (pool_k.max_pool2d_backward(dy, a1, x.shape, k, st_, p, variant=v)
                for v in ("cpu_v1", "cpu_v2"))
    assert np.array_equal(dx1.view(np.uint8), dx2.view(np.uint8))


def test_max_pool_gradcheck():
    x = np.random.default_rng(0).permutation(np.arange(2 * 2 * 7 * 6, dtype=np.float64))
    xt = Tensor(x.reshape(2, 2, 7, 6) / 10, requires_grad=True)
    assert gradcheck(lambda t: F.max_pool2d(t, 3, 2, 1, ceil_mode=True), [xt], eps=1e-6)


# ---- bilinear -----------------------------------------------------------------------------------
@st.composite
def resize_case(draw, small=False):
    top = 5 if small else 12
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, top)),
             draw(st.integers(1, top)))
    size = (draw(st.integers(1, 2 * top)), draw(st.integers(1, 2 * top)))
    x = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(shape)
    return x, size, draw(st.booleans())


def check_resize(variant, case, dtype=np.float64):
    x, size, ac = case
    x = x.astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.interpolate(xt, size=size, mode="bilinear", align_corners=ac)
    dy = np.random.default_rng(1).standard_normal(tuple(yt.shape)).astype(dtype)
    yt.backward(torch.tensor(dy))
    device = bil_k.VARIANTS[variant].device
    y = to_numpy(bil_k.bilinear_forward(on_device(x, device), size, ac, variant=variant))
    dx = to_numpy(bil_k.bilinear_backward(on_device(dy, device), x.shape, ac, variant=variant))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=tol * 10)


@pytest.mark.parametrize("variant", sorted(bil_k.VARIANTS))
def test_bilinear_variants_match_torch(variant):
    device = bil_k.VARIANTS[variant].device

    @settings_for(device)
    @given(case=resize_case(small=device == "cuda"))
    def run(case):
        check_resize(variant, case)

    run()


@pytest.mark.parametrize("variant", sorted(bil_k.VARIANTS))
@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_deeplab_upsampling_float32(variant, align_corners):
    """Logits at 1/8 resolution back to the label size: 41×41 → 321×321 (smaller under the
    simulator)."""
    size = (321, 321) if bil_k.VARIANTS[variant].device == "cpu" or CUDA_MODE == "gpu" \
        else (17, 15)
    src = (41, 41) if size[0] == 321 else (3, 2)
    x = np.random.default_rng(2).standard_normal((1, 3) + src)
    check_resize(variant, (x, size, align_corners), np.float32)


def test_bilinear_gradcheck():
    x = Tensor(np.random.default_rng(0).standard_normal((1, 2, 4, 5)), requires_grad=True)
    assert gradcheck(lambda t: F.interpolate(t, (7, 3)), [x])
    assert gradcheck(lambda t: F.interpolate(t, (6, 9), align_corners=True), [x])


# ---- batch norm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(bn_k.VARIANTS))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batch_norm_variants_match_torch(variant, training, relu, dtype):
    rng = np.random.default_rng(int(training) + 2 * int(relu))
    N, C, H, W = (2, 3, 5, 7) if bn_k.VARIANTS[variant].device == "cpu" else (2, 3, 3, 2)
    x = (rng.standard_normal((N, C, H, W)) * 2 + 1).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = rng.standard_normal(C).astype(dtype), (rng.random(C) + 0.5).astype(dtype)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    rmt, rvt = torch.tensor(rm), torch.tensor(rv)
    yt = torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, training, 0.1, 1e-5)
    yt = torch.relu(yt) if relu else yt
    dy = rng.standard_normal(yt.shape).astype(dtype)
    yt.backward(torch.tensor(dy))
    dev = bn_k.VARIANTS[variant].device
    rm2, rv2 = on_device(rm.copy(), dev), on_device(rv.copy(), dev)
    y, saved = bn_k.batch_norm_forward(on_device(x, dev), rm2, rv2, on_device(w, dev),
                                       on_device(b, dev), training, 0.1, 1e-5, relu,
                                       variant=variant)
    grads = bn_k.batch_norm_backward(on_device(dy, dev), on_device(x, dev), y, saved,
                                     on_device(w, dev), training, relu, variant=variant)
    tol = 1e-10 if dtype == np.float64 else 2e-5
    for ours, ref in zip([y, *grads, rm2, rv2], [yt, xt.grad, wt.grad, bt.grad, rmt, rvt]):
        ours = to_numpy(ours)
        assert ours.dtype == dtype
        np.testing.assert_allclose(ours, ref.detach().numpy(), atol=tol, rtol=tol)


@pytest.mark.parametrize("variant", sorted(bn_k.VARIANTS))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_with_residual_matches_torch(variant, training, relu):
    # relu(bn(x) + residual): every variant (fused kernels or composed) against PyTorch
    rng = np.random.default_rng(5 + int(training) + 2 * int(relu))
    N, C, H, W = (2, 3, 5, 7) if bn_k.VARIANTS[variant].device == "cpu" else (2, 3, 3, 2)
    x, res = ((rng.standard_normal((N, C, H, W)) * 2 + 1).astype(np.float32) for _ in range(2))
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32) * 1.5
    xt, rt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, res, w, b))
    yt = torch.nn.functional.batch_norm(xt, torch.tensor(rm), torch.tensor(rv), wt, bt,
                                        training, 0.1, 1e-5) + rt
    yt = torch.relu(yt) if relu else yt
    dy = rng.standard_normal(yt.shape).astype(np.float32)
    yt.backward(torch.tensor(dy))
    dev = bn_k.VARIANTS[variant].device
    y, saved = bn_k.batch_norm_forward(on_device(x, dev), on_device(rm, dev), on_device(rv, dev),
                                       on_device(w, dev), on_device(b, dev), training, 0.1,
                                       1e-5, relu, variant=variant,
                                       residual=on_device(res, dev))
    grads = bn_k.batch_norm_backward(on_device(dy, dev), on_device(x, dev), y, saved,
                                     on_device(w, dev), training, relu, variant=variant,
                                     residual=True)
    assert len(grads) == 4
    for ours, ref in zip([y, *grads], [yt, xt.grad, wt.grad, bt.grad, rt.grad]):
        ours = to_numpy(ours)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref.detach().numpy(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 7, 5, 3), (1, 1, 4, 5), (3, 6, 1, 2), (1, 9, 11, 13)])
def test_batch_norm_cpu_v3_is_bit_identical_to_cpu_v1(shape, dtype):
    # cpu_v3 reorganises cpu_v1's loops without changing any sum's order: every bit agrees,
    # channel counts that are not a multiple of its group of 4 included.
    rng = np.random.default_rng(shape[1])
    C = shape[1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    v1, v3 = bn_k.VARIANTS["cpu_v1"], bn_k.VARIANTS["cpu_v3"]
    stats1, stats3 = v1.stats(x, 1e-5), v3.stats(x, 1e-5)
    for a, b_ in zip(stats1, stats3):
        assert np.array_equal(a, b_)
    for relu in (False, True):
        y1 = v1.forward(x, *stats1, w, b, relu)
        y3 = v3.forward(x, *stats1, w, b, relu)
        assert np.array_equal(y1, y3)
        if relu:
            assert (y1 == 0).any()  # the mask has something to do
        for training in (False, True):
            for a, b_ in zip(v1.backward(dy, x, y1, *stats1, w, training, relu),
                             v3.backward(dy, x, y1, *stats1, w, training, relu)):
                assert a.dtype == b_.dtype and np.array_equal(a, b_)


@pytest.mark.parametrize("variant", sorted(v for v in bn_k.VARIANTS
                                     if bn_k.VARIANTS[v].device == "cpu"))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_with_residual_equals_the_separate_operations(variant, training, relu,
                                                                 dtype):
    # relu(bn(x) + residual) in one call, against bn, + and ReLU as three autograd
    # operations: every bit of the output and of all four gradients
    rng = np.random.default_rng(int(training) + 2 * int(relu))
    shape = (2, 5, 7, 3)
    x, res, dy = ((rng.standard_normal(shape) * 2 + 1).astype(dtype) for _ in range(3))
    w, b = rng.standard_normal(5).astype(dtype), rng.standard_normal(5).astype(dtype)

    def run(fused):
        xt, rt, wt, bt = (Tensor(a.copy(), requires_grad=True) for a in (x, res, w, b))
        stats = np.zeros(5, dtype), np.ones(5, dtype) * 1.5
        if fused:
            y = F.batch_norm(xt, *stats, wt, bt, training, relu=relu, residual=rt)
        else:
            y = F.batch_norm(xt, *stats, wt, bt, training) + rt
            y = F.relu(y) if relu else y
        y.backward(Tensor(dy))
        return [y.data, xt.grad, rt.grad, wt.grad, bt.grad, *stats]

    saved = bn_k.DEFAULT["cpu"]
    bn_k.DEFAULT["cpu"] = variant
    try:
        fused, separate = run(True), run(False)
    finally:
        bn_k.DEFAULT["cpu"] = saved
    if relu:
        assert (fused[0] == 0).any() and (fused[0] > 0).any()
    for a, b_ in zip(fused, separate):
        assert a.dtype == b_.dtype and np.array_equal(a, b_)


@pytest.mark.parametrize("variant", sorted(v for v in bn_k.VARIANTS
                                     if bn_k.VARIANTS[v].device == "cpu"))
def test_batch_norm_residual_gradcheck(variant, monkeypatch):
    monkeypatch.setitem(bn_k.DEFAULT, "cpu", variant)  # fused kernels and composed paths
    rng = np.random.default_rng(3)
    x, r = (Tensor(rng.standard_normal((2, 3, 3, 4)), requires_grad=True) for _ in range(2))
    w = Tensor(rng.standard_normal(3), requires_grad=True)

    def fn(x, r, w):
        return F.batch_norm(x, np.zeros(3), np.ones(3), w, None, training=True, relu=True,
                            residual=r)

    assert gradcheck(fn, [x, r, w])


def test_batch_norm_rejects_a_residual_of_another_shape():
    x = Tensor(np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        F.batch_norm(x, np.zeros(2), np.ones(2), residual=Tensor(np.zeros((1, 2, 4, 3),
                                                                             np.float32)))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        F.batch_norm(x, np.zeros(2), np.ones(2), residual=Tensor(np.zeros((1, 2, 4, 4))))


def test_batch_norm_benchmark_runs_and_checks_the_bits():
    import io

    from tinydeeplab.benchmarks import bench_batch_norm

    out = io.StringIO()
    bench_batch_norm.run(repeat=1, rounds=1, out=out, shapes=[(2, 5, 3, 7)])
    row = out.getvalue().splitlines()[-1]
    assert row.startswith("| 2×5×3×7 |") and row.endswith("| yes |")


@pytest.mark.parametrize("variant", sorted(v for v in bn_k.VARIANTS
                                     if bn_k.VARIANTS[v].device == "cpu"))
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_gradcheck(training, variant, monkeypatch):
    monkeypatch.setitem(bn_k.DEFAULT, "cpu", variant)  # F.batch_norm runs the default
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 3, 3, 4)), requires_grad=True)
    w = Tensor(rng.standard_normal(3), requires_grad=True)
    b = Tensor(rng.standard_normal(3), requires_grad=True)

    def fn(x, w, b):  # fresh running statistics each call: finite differences call it often
        return F.batch_norm(x, np.zeros(3), np.ones(3) * 1.5, w, b, training=training)

    assert gradcheck(fn, [x, w, b])


# ---- bad input ----------------------------------------------------------------------------------
def test_spatial_ops_reject_bad_input():
    x = Tensor(np.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match="4-D"):
        F.max_pool2d(Tensor(np.zeros((2, 4, 4))), 2)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        F.max_pool2d(x, 5)
    with pytest.raises(ValueError, match="padding"):
        F.max_pool2d(x, 3, 1, 2)
    with pytest.raises(ValueError, match="stride"):
        F.max_pool2d(x, 3, 0)
    with pytest.raises(ValueError, match="size"):
        F.interpolate(x, (0, 3))
    with pytest.raises(ValueError, match="mode"):
        F.interpolate(x, (3, 3), mode="nearest")
    with pytest.raises(ValueError, match=r"weight must have shape \(2,\)"):
        F.batch_norm(x, np.zeros(2), np.ones(2), Tensor(np.ones(3)), None)
    with pytest.raises(ValueError, match="more than one value"):
        F.batch_norm(Tensor(np.zeros((1, 2, 1, 1))), np.zeros(2), np.ones(2), training=True)
    with pytest.raises(ValueError, match="running_mean"):
        F.batch_norm(x, None, None, training=False)
