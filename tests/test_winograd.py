"""Winograd F(2×2, 3×3) (the rung of cpu_v4 and, channels last, cpu_v5 for large 3×3 layers)
and F(4×4, 3×3) (cpu_v6): the NumPy reference, the rungs' Numba transforms, and cpu_v4-v6 forced
onto small shapes, against the float64 loops, PyTorch and finite differences; and the rules
that decide when they take it."""
import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinydeeplab.functional as F
from test_atrous_conv import check_variant, reference_conv2d, torch_conv2d
from tinydeeplab import Tensor, gradcheck
from tinydeeplab.kernels import atrous_conv
from tinydeeplab.kernels import atrous_conv_winograd as winograd


def F4(fn):
    """A channels-last Winograd function by F(4×4, 3×3) (cpu_v6's tile)."""
    return functools.partial(fn, m=4)


@st.composite
def stride1_3x3_case(draw):
    """Odd, non-square sizes; any dilation and padding (also above the dilation)."""
    N, C, K = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    d = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    pad = (draw(st.integers(0, 2 * d[0])), draw(st.integers(0, 2 * d[1])))
    H = draw(st.integers(max(1, 2 * d[0] + 1 - 2 * pad[0]), 14))
    W = draw(st.integers(max(1, 2 * d[1] + 1 - 2 * pad[1]), 14))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return (rng.standard_normal((N, C, H, W)), rng.standard_normal((K, C, 3, 3)),
            rng.standard_normal(K), (1, 1), pad, d)


@settings(max_examples=40, deadline=None)
@given(case=stride1_3x3_case())
def test_reference_and_fast_forward_equal_the_loops(case):
    x, w, b, _, pad, d = case
    y_ref = reference_conv2d(x, w, b, (1, 1), pad, d)
    for m in (2, 4):
        np.testing.assert_allclose(winograd.winograd_reference(x, w, b, pad, d, m), y_ref,
                                   atol=1e-11)
    for forward in (winograd.forward, winograd.forward_cl, F4(winograd.forward_cl)):
        np.testing.assert_allclose(forward(x, w, b, pad, d, 1 << 26), y_ref, atol=1e-11)
        # images one at a time (a budget too small for two) give the same result
        np.testing.assert_allclose(forward(x, w, b, pad, d, 1), y_ref, atol=1e-11)


@settings(max_examples=30, deadline=None)
@given(case=stride1_3x3_case())
def test_weight_gradient_is_the_adjoint_of_the_forward(case):
    """dw from the transposed transforms equals the loops' dw, whole or image by image."""
    x, w, _, _, pad, d = case
    y = reference_conv2d(x, w, None, (1, 1), pad, d)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    _, dw_ref, _ = atrous_conv.conv2d_backward(x, w, dy, 1, pad, d, variant="cpu_v1")
    for weight_gradient in (winograd.weight_gradient, winograd.weight_gradient_cl,
                            F4(winograd.weight_gradient_cl)):
        np.testing.assert_allclose(weight_gradient(x, dy, pad, d, 1 << 26), dw_ref, atol=1e-10)
        np.testing.assert_allclose(weight_gradient(x, dy, pad, d, 1), dw_ref, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(case=stride1_3x3_case())
def test_channels_last_transforms_are_bit_identical_to_cpu_v4s(case):
    """cpu_v5's transforms do cpu_v4's additions in cpu_v4's order, channels last: V, and Y
    from a given M, agree bit for bit (only the GEMMs' summation order differs)."""
    x, _, _, _, (ph, pw), (dh, dw) = case
    x = x.astype(np.float32)
    N, C, H, W = x.shape
    Ho, Wo = H + 2 * ph - 2 * dh, W + 2 * pw - 2 * dw
    rows, cols = winograd.tile_origins(Ho, dh), winograd.tile_origins(Wo, dw)
    P = N * len(rows) * len(cols)
    V = np.empty((16, C, P), np.float32)
    winograd._input_transform_cpu(x, V, rows, cols, ph, pw, dh, dw)
    xh = np.full((N, Ho + 3 * dh, Wo + 3 * dw, C), np.nan, np.float32)  # the padding written
    winograd._padded_channels_last_cpu(x, xh, ph, pw)
    V_cl = np.empty((16, P, C), np.float32)
    winograd._input_transform_cl_cpu(xh, V_cl, rows, cols, dh, dw)
    assert np.array_equal(V_cl, V.transpose(0, 2, 1))
    M = np.random.default_rng(2).standard_normal((16, 3, P)).astype(np.float32)
    y, y_cl = np.empty((N, 3, Ho, Wo), np.float32), np.full((N, 3, Ho, Wo), np.nan, np.float32)
    winograd._output_transform_cpu(M, y, rows, cols, dh, dw)
    winograd._output_transform_cl_cpu(np.ascontiguousarray(M.transpose(0, 2, 1)), y_cl, rows,
                                      cols, dh, dw)
    assert np.array_equal(y_cl, y)


def test_float32_rounding_is_bounded():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 64, 23, 19)).astype(np.float32)
    w = (rng.standard_normal((48, 64, 3, 3)) * 0.1).astype(np.float32)
    y_ref = reference_conv2d(x, w, None, (1, 1), (2, 2), (2, 2))
    for forward, bound in ((winograd.forward, 2e-6), (winograd.forward_cl, 2e-6),
                           (F4(winograd.forward_cl), 1e-5)):  # F(4×4): 6.7e-6 here
        y = forward(x, w, None, (2, 2), (2, 2), 1 << 26)
        assert y.dtype == np.float32
        assert np.abs(y - y_ref).max() / np.abs(y_ref).max() < bound


@pytest.fixture
def winograd_everywhere(monkeypatch):
    """cpu_v4-v6 take Winograd for every stride-1 3×3 layer, however small (cpu_v6 by
    F(4×4))."""
    monkeypatch.setattr(atrous_conv, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(atrous_conv, "WINOGRAD_MIN_FLOPS", 0)
    monkeypatch.setattr(atrous_conv, "WINOGRAD_CL_MIN_FLOPS", 0)
    monkeypatch.setattr(atrous_conv, "WINOGRAD_CL_MIN_TILES", 0)
    monkeypatch.setattr(atrous_conv, "WINOGRAD_CL_MAX_OVERHANG", np.inf)
    monkeypatch.setattr(atrous_conv, "WINOGRAD4_MIN_CHANNELS", 1)
    monkeypatch.setattr(atrous_conv, "WINOGRAD4_MIN_TILES", 0)
    monkeypatch.setattr(atrous_conv, "WINOGRAD4_MAX_OVERHANG", np.inf)


# the variants that take Winograd, and the suffix of their functions
WINOGRAD_VARIANTS = {"cpu_v4": "", "cpu_v5": "_cl", "cpu_v6": "_cl"}


@pytest.mark.parametrize("variant", WINOGRAD_VARIANTS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forced_winograd_matches_reference_and_torch(variant, dtype, winograd_everywhere):
    @settings(max_examples=25, deadline=None)
    @given(case=stride1_3x3_case())
    def check(case):
        check_variant(variant, case, dtype)

    check()


@pytest.mark.parametrize("variant", WINOGRAD_VARIANTS)
def test_forced_winograd_takes_the_winograd_path(variant, winograd_everywhere, monkeypatch):
    calls = []
    suffix = WINOGRAD_VARIANTS[variant]
    for name in ("forward" + suffix, "weight_gradient" + suffix, "input_gradient" + suffix):
        monkeypatch.setattr(winograd, name, lambda *a, f=getattr(winograd, name), n=name, **k:
                            calls.append((n.removesuffix(suffix), k.get("m", 2))) or f(*a, **k))
    x, w = np.ones((1, 2, 7, 9)), np.ones((3, 2, 3, 3))
    atrous_conv.conv2d_forward(x, w, None, 1, 2, 2, variant=variant)
    atrous_conv.conv2d_backward(x, w, np.ones((1, 3, 7, 9)), 1, 2, 2, variant=variant)
    # forward; dw; dx as the flipped convolution (cpu_v4 through forward, cpu_v5 and v6
    # through the forward's GEMMs and transforms from their own flipped U); cpu_v6 by F(4×4)
    m = 4 if variant == "cpu_v6" else 2
    expected = [("forward", m), ("weight_gradient", m), ("input_gradient", m)]
    expected += [("forward", m)] if variant == "cpu_v4" else []
    assert calls == expected
    atrous_conv.conv2d_backward(x, w, np.ones((1, 3, 7, 9)), 1, 2, 2, variant=variant,
                                need_dx=False)
    assert calls[len(expected):] == [("weight_gradient", m)]


@pytest.mark.parametrize("variant", WINOGRAD_VARIANTS)
def test_gradcheck_through_forced_winograd(variant, winograd_everywhere, monkeypatch):
    monkeypatch.setitem(atrous_conv.DEFAULT, "cpu", variant)
    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((2, 2, 7, 6)), requires_grad=True)
    w = Tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    b = Tensor(rng.standard_normal(3), requires_grad=True)
    assert gradcheck(lambda x, w, b: F.conv2d(x, w, b, 1, 3, 2), [x, w, b])


@pytest.mark.parametrize("lowering", ["winograd", "winograd_cl", "winograd_cl4"])
def test_when_cpu_v4_to_v6_take_winograd(lowering):
    def pays(x_shape, w_shape, stride, padding, dilation):
        return atrous_conv.winograd_pays(x_shape, w_shape, stride, padding, dilation, 4,
                                         lowering)

    assert pays((1, 512, 41, 41), (512, 512, 3, 3), (1, 1), (4, 4), (4, 4))  # ResNet layer4
    assert pays((1, 256, 41, 41), (256, 256, 3, 3), (1, 1), (2, 2), (2, 2))  # layer3
    assert not pays((1, 2048, 41, 41), (21, 2048, 3, 3), (1, 1), (12, 12), (12, 12))  # ASPP
    assert not pays((4, 64, 21, 21), (64, 64, 3, 3), (1, 1), (2, 2), (2, 2))  # small
    assert not pays((1, 512, 41, 41), (512, 512, 3, 3), (2, 2), (1, 1), (1, 1))  # strided
    assert not pays((1, 512, 41, 41), (512, 512, 1, 1), (1, 1), (0, 0), (1, 1))  # 1×1
    # where only cpu_v5's cheaper transforms pay (0.4-1.5 GFLOP, ≥ 256 tiles, 2×2 tiles
    # that fit the map)
    mid = [((2, 64, 65, 65), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1)),  # 0.62 GFLOP
           ((2, 128, 33, 33), (128, 128, 3, 3), (1, 1), (2, 2), (2, 2))]  # 578 tiles
    assert all(pays(*case) == (lowering != "winograd") for case in mid)
    # 2.1 GFLOP in 121 tiles: v4's rule (by FLOPs alone) takes it, v5's not
    assert pays((1, 512, 21, 21), (512, 512, 3, 3), (1, 1), (2, 2), (2, 2)) == \
        (lowering == "winograd")
    assert not pays((4, 128, 21, 21), (128, 128, 3, 3), (1, 1), (4, 4), (4, 4))  # 31 % past
    # two more in 0.4-0.6 GFLOP; below 0.4 neither rule takes a layer
    assert pays((1, 128, 41, 41), (128, 128, 3, 3), (1, 1), (2, 2), (2, 2)) == \
        (lowering != "winograd")
    assert pays((4, 128, 21, 21), (128, 128, 3, 3), (1, 1), (2, 2), (2, 2)) == \
        (lowering != "winograd")  # the tiny model at 4 × 161², 0.52 GFLOP, 484 tiles
    assert not pays((4, 64, 21, 21), (128, 64, 3, 3), (1, 1), (2, 2), (2, 2))  # 0.26 GFLOP
    assert not pays((4, 128, 15, 15), (128, 128, 3, 3), (1, 1), (2, 2), (2, 2))  # the demo's


def test_when_cpu_v6_takes_f4x4():
    def tile(x_shape, w_shape, d):
        return atrous_conv.winograd_tile(x_shape, w_shape, (d, d), (d, d))

    assert tile((2, 128, 65, 65), (128, 128, 3, 3), 2) == 4  # 578 tiles, 9 % past the map
    assert tile((4, 256, 41, 41), (256, 256, 3, 3), 2) == 4  # ResNet layer3 at batch 4
    assert tile((1, 128, 81, 81), (128, 128, 3, 3), 1) == 4  # 441 tiles
    assert tile((1, 256, 41, 41), (256, 256, 3, 3), 2) == 2  # 121 tiles: too few rows
    assert tile((4, 512, 41, 41), (512, 512, 3, 3), 4) == 2  # 37 % of the outputs past
    assert tile((2, 64, 65, 65), (64, 64, 3, 3), 1) == 2  # 64 channels
    # F(4×4)'s buffers are smaller than F(2×2)'s wherever it is taken: the budget that
    # winograd_pays checks holds for both
    for shape, d in (((2, 128, 65, 65), 2), ((4, 256, 41, 41), 2), ((1, 128, 81, 81), 1)):
        C, n = shape[1], shape[2]
        assert winograd.channels_last_bytes(C, C, n, n, (d, d), 4, 4) < \
            winograd.channels_last_bytes(C, C, n, n, (d, d), 4, 2)


def test_tile_sizes_other_than_2_and_4_are_refused():
    x, w = np.ones((1, 2, 7, 9)), np.ones((3, 2, 3, 3))
    for m in (3, 6):
        with pytest.raises(ValueError, match="m .* must be 2 or 4, got " + str(m)):
            winograd.forward_cl(x, w, None, (1, 1), (1, 1), 1 << 26, m=m)
        with pytest.raises(ValueError, match="must be 2 or 4"):
            winograd.winograd_reference(x, w, None, (1, 1), (1, 1), m)


def test_cpu_v6_by_f4x4_on_a_layer_its_rule_picks():
    """Not forced: a 128-channel 3×3 layer on 65² (289 tiles of 4×4) in float32, against
    float64 PyTorch, forward and backward.  F(4×4)'s rounding: 0.8-1.1e-5 of the largest
    value for y, dx and dw over two seeds, against 4-7e-7 for cpu_v3 and cpu_v5."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 128, 65, 65))
    w = rng.standard_normal((128, 128, 3, 3)) * 0.03
    assert atrous_conv.winograd_tile(x.shape, w.shape, (1, 1), (1, 1)) == 4
    dy = rng.standard_normal((1, 128, 65, 65))
    y_t, dx_t, dw_t, _ = torch_conv2d(x, w, np.zeros(128), dy, (1, 1), (1, 1), (1, 1))
    f32 = [a.astype(np.float32) for a in (x, w, dy)]
    y = atrous_conv.conv2d_forward(f32[0], f32[1], None, 1, 1, 1, variant="cpu_v6")
    dx, dw, _ = atrous_conv.conv2d_backward(*f32, 1, 1, 1, variant="cpu_v6")
    for ours, ref in ((y, y_t), (dx, dx_t), (dw, dw_t)):
        assert ours.dtype == np.float32
        assert np.abs(ours - ref).max() / np.abs(ref).max() < 3e-5


@pytest.mark.parametrize("variant", WINOGRAD_VARIANTS)
def test_winograd_buffers_stay_within_the_budget(variant, monkeypatch):
    """Winograd chunks by images: where one image's tiles exceed the budget, cpu_v4 and v5
    leave the layer to v3's row chunks; otherwise every buffer they ask for fits."""
    shape, kernel = (2, 256, 41, 41), (256, 256, 3, 3)
    lowering = "winograd" + WINOGRAD_VARIANTS[variant]
    assert atrous_conv.winograd_pays(shape, kernel, (1, 1), (2, 2), (2, 2), 4, lowering)
    monkeypatch.setitem(atrous_conv.COLS_BUDGET_BYTES, "cpu", 1 << 20)
    assert not atrous_conv.winograd_pays(shape, kernel, (1, 1), (2, 2), (2, 2), 4, lowering)
    monkeypatch.setitem(atrous_conv.COLS_BUDGET_BYTES, "cpu", 24 << 20)  # one image, not two
    requested = []
    original = atrous_conv._Workspace.get

    def recording(self, name, shape, dtype, xp):
        requested.append((name, int(np.prod(shape)) * np.dtype(dtype).itemsize))
        return original(self, name, shape, dtype, xp)

    monkeypatch.setattr(atrous_conv._Workspace, "get", recording)
    monkeypatch.setattr(atrous_conv, "WINOGRAD_MIN_FLOPS", 0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    w = rng.standard_normal(kernel, dtype=np.float32) * 0.02
    y = atrous_conv.conv2d_forward(x, w, None, 1, 2, 2, variant=variant)
    atrous_conv.conv2d_backward(x, w, np.ones_like(y), 1, 2, 2, variant=variant)
    assert any(name.startswith("winograd") for name, _ in requested)
    assert max(size for _, size in requested) <= 24 << 20
    y_ref = reference_conv2d(x, w, None, (1, 1), (2, 2), (2, 2))
    assert np.abs(y - y_ref).max() / np.abs(y_ref).max() < 2e-6


@pytest.mark.parametrize("variant", WINOGRAD_VARIANTS)
def test_forced_winograd_with_padding_above_twice_the_rate(variant, winograd_everywhere):
    """Padding > 2d: the forward by Winograd, the backward v3's way (col2im), both right."""
    rng = np.random.default_rng(4)
    case = (rng.standard_normal((2, 3, 7, 9)), rng.standard_normal((4, 3, 3, 3)),
            rng.standard_normal(4), (1, 1), (5, 3), (2, 1))
    check_variant(variant, case, np.float64)


def _blas_or_skip():
    from tinydeeplab.kernels import _gemm_batch

    blas = _gemm_batch._blas_controller()
    if not blas:
        pytest.skip("NumPy's BLAS cannot be controlled by threadpoolctl here: matmul_batch is "
                    "plain np.matmul, nothing to compare")
    return _gemm_batch, blas


@pytest.mark.parametrize("E, T, C, K", [(16, 37, 24, 40), (36, 121, 64, 48), (3, 5, 7, 9)])
def test_split_gemm_batch_is_one_threaded_blas_per_gemm(E, T, C, K):
    """matmul_batch gives each GEMM of the batch to one thread with BLAS on one thread: the
    result is np.matmul's with BLAS on one thread, bit for bit, for any thread count (odd
    batch sizes: shares of unequal length), and the thread count is put back afterwards."""
    gemm_batch, blas = _blas_or_skip()
    rng = np.random.default_rng(5)
    a = rng.standard_normal((E, T, C)).astype(np.float32)
    b = rng.standard_normal((E, K, C)).astype(np.float32).transpose(0, 2, 1)  # as U[e]ᵀ
    before = blas.get_num_threads()
    try:
        blas.set_num_threads(1)
        one_thread = np.matmul(a, b)
        for threads in (1, 2, 3):
            blas.set_num_threads(threads)
            out = np.full((E, T, K), np.nan, np.float32)
            assert gemm_batch.matmul_batch(a, b, out) is out
            assert np.array_equal(out, one_thread), threads
            assert blas.get_num_threads() == threads
            dU = gemm_batch.matmul_batch(out.transpose(0, 2, 1), a, np.empty((E, K, C),
                                                                             np.float32))
            np.testing.assert_allclose(dU, np.matmul(out.transpose(0, 2, 1).astype(np.float64),
                                                     a.astype(np.float64)), rtol=1e-4,
                                       atol=1e-3)
    finally:
        blas.set_num_threads(before)


def test_split_gemm_batch_puts_the_thread_count_back_after_an_error(monkeypatch):
    gemm_batch, blas = _blas_or_skip()
    before = blas.get_num_threads()
    try:
        blas.set_num_threads(2)
        a = np.ones((4, 3, 5), np.float32)
        with pytest.raises(ValueError):
            gemm_batch.matmul_batch(a, np.ones((4, 6, 2), np.float32),
                                    np.empty((4, 3, 2), np.float32))  # inner sizes 5 ≠ 6
        assert blas.get_num_threads() == 2
        monkeypatch.setattr(gemm_batch, "SPLIT", False)  # off: plain np.matmul
        out = gemm_batch.matmul_batch(a, np.ones((4, 5, 2), np.float32),
                                      np.empty((4, 3, 2), np.float32))
        assert np.array_equal(out, np.full((4, 3, 2), 5, np.float32))
    finally:
        blas.set_num_threads(before)


def test_split_gemm_batch_works_in_a_forked_child():
    """A child forked after a batch has run gets a fresh pool and lock: its own batch runs."""
    import os

    gemm_batch, blas = _blas_or_skip()
    if not hasattr(os, "fork"):
        pytest.skip("no fork() on this platform")
    a = np.ones((4, 3, 5), np.float32)
    b = np.ones((4, 5, 2), np.float32)
    before = blas.get_num_threads()
    try:
        blas.set_num_threads(2)
        gemm_batch.matmul_batch(a, b, np.empty((4, 3, 2), np.float32))  # the pool now exists
        pid = os.fork()
        if pid == 0:
            import signal

            signal.alarm(120)  # a child stuck waiting on the parent's threads dies, and fails
            ok = np.array_equal(gemm_batch.matmul_batch(a, b, np.empty((4, 3, 2), np.float32)),
                                np.full((4, 3, 2), 5, np.float32))
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        blas.set_num_threads(before)


def test_split_gemm_batch_finds_numpys_blas_among_several(monkeypatch):
    """With SciPy's OpenBLAS loaded beside NumPy's, the batch controls NumPy's; where it
    cannot tell which is NumPy's, it does not split (plain np.matmul)."""
    import threadpoolctl

    from tinydeeplab.kernels import _gemm_batch

    class Lib:
        def __init__(self, path):
            self.filepath = path

    found = []

    class Controller:
        def select(self, user_api):
            assert user_api == "blas"
            return type("Selection", (), {"lib_controllers": found})()

    monkeypatch.setattr(threadpoolctl, "ThreadpoolController", Controller)
    numpys = Lib("/env/site-packages/numpy.libs/libscipy_openblas64_-abc.so")
    scipys = Lib("/env/site-packages/scipy.libs/libscipy_openblas-def.so")
    for libs, expected in (([scipys, numpys], numpys), ([scipys], scipys),
                           ([scipys, Lib("/usr/lib/libopenblas.so.0")], False), ([], False)):
        found[:] = libs
        monkeypatch.setattr(_gemm_batch, "_blas", None)
        assert _gemm_batch._blas_controller() is expected
    a = np.ones((4, 3, 5), np.float32)
    out = _gemm_batch.matmul_batch(a, np.ones((4, 5, 2), np.float32),
                                   np.empty((4, 3, 2), np.float32))  # False: np.matmul
    assert np.array_equal(out, np.full((4, 3, 2), 5, np.float32))
