"""Winograd F(2×2, 3×3) (cpu_v4's rung for large 3×3 layers): the NumPy reference, the Numba
transforms, and cpu_v4 forced onto small shapes, against the float64 loops, PyTorch and finite
differences; and the rule that decides when cpu_v4 takes it."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinydeeplab.functional as F
from test_atrous_conv import check_variant, reference_conv2d
from tinydeeplab import Tensor, gradcheck
from tinydeeplab.kernels import atrous_conv
from tinydeeplab.kernels import atrous_conv_winograd as winograd


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
    np.testing.assert_allclose(winograd.winograd_reference(x, w, b, pad, d), y_ref, atol=1e-11)
    np.testing.assert_allclose(winograd.forward(x, w, b, pad, d, 1 << 26), y_ref, atol=1e-11)
    # images one at a time (a budget too small for two) give the same result
    np.testing.assert_allclose(winograd.forward(x, w, b, pad, d, 1), y_ref, atol=1e-11)


@settings(max_examples=30, deadline=None)
@given(case=stride1_3x3_case())
def test_weight_gradient_is_the_adjoint_of_the_forward(case):
    """dw from the transposed transforms equals the loops' dw, whole or image by image."""
    x, w, _, _, pad, d = case
    y = reference_conv2d(x, w, None, (1, 1), pad, d)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    _, dw_ref, _ = atrous_conv.conv2d_backward(x, w, dy, 1, pad, d, variant="cpu_v1")
    np.testing.assert_allclose(winograd.weight_gradient(x, dy, pad, d, 1 << 26), dw_ref,
                               atol=1e-10)
    np.testing.assert_allclose(winograd.weight_gradient(x, dy, pad, d, 1), dw_ref, atol=1e-10)


def test_float32_rounding_is_bounded():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 64, 23, 19)).astype(np.float32)
    w = (rng.standard_normal((48, 64, 3, 3)) * 0.1).astype(np.float32)
    y_ref = reference_conv2d(x, w, None, (1, 1), (2, 2), (2, 2))
    y = winograd.forward(x, w, None, (2, 2), (2, 2), 1 << 26)
    assert y.dtype == np.float32
    assert np.abs(y - y_ref).max() / np.abs(y_ref).max() < 2e-6


@pytest.fixture
def winograd_everywhere(monkeypatch):
    """cpu_v4 takes Winograd for every stride-1 3×3 layer, however small."""
    monkeypatch.setattr(atrous_conv, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(atrous_conv, "WINOGRAD_MIN_FLOPS", 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cpu_v4_forced_matches_reference_and_torch(dtype, winograd_everywhere):
    @settings(max_examples=25, deadline=None)
    @given(case=stride1_3x3_case())
    def check(case):
        check_variant("cpu_v4", case, dtype)

    check()


def test_cpu_v4_forced_takes_the_winograd_path(winograd_everywhere, monkeypatch):
    calls = []
    for name in ("forward", "weight_gradient"):
        monkeypatch.setattr(winograd, name, lambda *a, f=getattr(winograd, name), n=name:
                            calls.append(n) or f(*a))
    x, w = np.ones((1, 2, 7, 9)), np.ones((3, 2, 3, 3))
    atrous_conv.conv2d_forward(x, w, None, 1, 2, 2, variant="cpu_v4")
    atrous_conv.conv2d_backward(x, w, np.ones((1, 3, 7, 9)), 1, 2, 2, variant="cpu_v4")
    # forward; dw; dx as the flipped convolution (through forward)
    assert calls == ["forward", "weight_gradient", "forward"]
    atrous_conv.conv2d_backward(x, w, np.ones((1, 3, 7, 9)), 1, 2, 2, variant="cpu_v4",
                                need_dx=False)
    assert calls[3:] == ["weight_gradient"]


def test_gradcheck_through_cpu_v4(winograd_everywhere, monkeypatch):
    monkeypatch.setitem(atrous_conv.DEFAULT, "cpu", "cpu_v4")
    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((2, 2, 7, 6)), requires_grad=True)
    w = Tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    b = Tensor(rng.standard_normal(3), requires_grad=True)
    assert gradcheck(lambda x, w, b: F.conv2d(x, w, b, 1, 3, 2), [x, w, b])


def test_when_cpu_v4_takes_winograd():
    pays = atrous_conv.winograd_pays
    assert pays((1, 512, 41, 41), (512, 512, 3, 3), (1, 1), (4, 4), (4, 4))  # ResNet layer4
    assert pays((1, 256, 41, 41), (256, 256, 3, 3), (1, 1), (2, 2), (2, 2))  # layer3
    assert not pays((1, 2048, 41, 41), (21, 2048, 3, 3), (1, 1), (12, 12), (12, 12))  # ASPP
    assert not pays((4, 64, 21, 21), (64, 64, 3, 3), (1, 1), (2, 2), (2, 2))  # small
    assert not pays((1, 512, 41, 41), (512, 512, 3, 3), (2, 2), (1, 1), (1, 1))  # strided
    assert not pays((1, 512, 41, 41), (512, 512, 1, 1), (1, 1), (0, 0), (1, 1))  # 1×1


def test_winograd_buffers_stay_within_the_budget(monkeypatch):
    """Winograd chunks by images: where one image's tiles exceed the budget, cpu_v4 leaves the
    layer to v3's row chunks; otherwise every buffer it asks for fits."""
    shape, kernel = (2, 256, 41, 41), (256, 256, 3, 3)
    assert atrous_conv.winograd_pays(shape, kernel, (1, 1), (2, 2), (2, 2))
    monkeypatch.setitem(atrous_conv.COLS_BUDGET_BYTES, "cpu", 1 << 20)
    assert not atrous_conv.winograd_pays(shape, kernel, (1, 1), (2, 2), (2, 2))
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
    y = atrous_conv.conv2d_forward(x, w, None, 1, 2, 2, variant="cpu_v4")
    atrous_conv.conv2d_backward(x, w, np.ones_like(y), 1, 2, 2, variant="cpu_v4")
    assert any(name.startswith("winograd") for name, _ in requested)
    assert max(size for _, size in requested) <= 24 << 20
    y_ref = reference_conv2d(x, w, None, (1, 1), (2, 2), (2, 2))
    assert np.abs(y - y_ref).max() / np.abs(y_ref).max() < 2e-6


def test_cpu_v4_forced_with_padding_above_twice_the_rate(winograd_everywhere):
    """Padding > 2d: the forward by Winograd, the backward v3's way (col2im), both right."""
    rng = np.random.default_rng(4)
    case = (rng.standard_normal((2, 3, 7, 9)), rng.standard_normal((4, 3, 3, 3)),
            rng.standard_normal(4), (1, 1), (5, 3), (2, 1))
    check_variant("cpu_v4", case, np.float64)
