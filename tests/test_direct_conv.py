"""The direct convolution rung (kernels/atrous_conv_direct.py, cpu_v7's for small layers): the
forward and the stems' weight gradient, both blocks, against the float64 reference and
PyTorch on odd shapes, the rules that pick them, the forward's adjoint against cpu_v7's
backward, and bad input."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import torch
from test_atrous_conv import reference_conv2d
from tinydeeplab.kernels import atrous_conv
from tinydeeplab.kernels import atrous_conv_direct as direct

L, R = direct.LANES, direct.BLOCK


def assert_close_to_float64(y, ref, what):
    scale = max(1.0, np.abs(ref).max())  # float32 sums of up to MAX_TAPS products
    np.testing.assert_allclose(y / scale, ref / scale, atol=2e-6, rtol=0, err_msg=what)


@st.composite
def direct_case(draw):
    """A layer the rung takes: K in whole blocks of LANES, C·kh·kw ≤ MAX_TAPS, Wo ≥ BLOCK."""
    kh, kw = draw(st.sampled_from([(3, 3), (7, 7), (1, 3), (3, 1), (2, 5), (5, 2)]))
    C = draw(st.integers(1, min(9, direct.MAX_TAPS // (kh * kw))))
    K = L * draw(st.integers(1, 3))
    N = draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    padding = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
    h_min = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    w_min = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1] + stride[1] * (R - 1))
    H = draw(st.integers(h_min, h_min + 9))
    W = draw(st.integers(w_min, w_min + 17))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((K, C, kh, kw)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    return x, w, b, stride, padding, dilation


@pytest.mark.parametrize("block", ["simd", "plain"])
@settings(max_examples=25, deadline=None)
@given(case=direct_case())
def test_both_blocks_match_the_float64_reference(block, case):
    x, w, b, stride, padding, dilation = case
    y = direct.forward(x, w, b, stride, padding, dilation, block=block)
    ref = reference_conv2d(x, w, b, stride, padding, dilation)
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert_close_to_float64(y, ref, f"{block} block")


@pytest.mark.parametrize("shape, K, kernel, stride, padding, dilation", [
    ((4, 3, 161, 161), 16, 7, 2, 3, 1),   # the tiny network's stem
    ((2, 16, 41, 39), 16, 3, 1, 1, 1),    # its 16-channel layers, one side odd
    ((3, 16, 41, 41), 32, 3, 2, 1, 1),    # the stride-2 3×3
    ((1, 32, 21, 23), 64, 3, 1, 2, 2),    # 32 channels at rate 2: 288 taps
    ((2, 64, 21, 21), 128, 3, 1, 2, 2),   # 64 channels: 576 taps, MAX_TAPS
    ((1, 3, 35, 50), 64, 7, 2, 3, 1),     # ResNet's stem, non-square
])
def test_network_layers_match_torch(shape, K, kernel, stride, padding, dilation):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((K, shape[1], kernel, kernel)).astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64),
                                     torch.tensor(w, dtype=torch.float64), None, stride,
                                     padding, dilation).numpy()
    assert atrous_conv.VARIANTS["cpu_v7"] is atrous_conv.VARIANTS[atrous_conv.DEFAULT["cpu"]]
    for block in ("simd", "plain"):
        pair = (stride, stride), (padding, padding), (dilation, dilation)
        assert_close_to_float64(direct.forward(x, w, None, *pair, block=block), ref, block)
    y7 = atrous_conv.conv2d_forward(x, w, None, stride, padding, dilation, variant="cpu_v7")
    y6 = atrous_conv.conv2d_forward(x, w, None, stride, padding, dilation, variant="cpu_v6")
    assert_close_to_float64(y7, ref, "cpu_v7")
    assert_close_to_float64(y7, y6.astype(np.float64), "cpu_v7 against cpu_v6")


def spy_on(monkeypatch, name):
    """Replace direct.<name> by a wrapper that records each call; return the record."""
    calls = []
    real = getattr(direct, name)

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(direct, name, spy)
    return calls


def test_cpu_v7_takes_the_rung_exactly_where_it_pays(monkeypatch):
    calls = spy_on(monkeypatch, "forward")
    rng = np.random.default_rng(0)
    cases = [  # (x shape, w shape, dtype, taken)
        ((2, 3, 30, 30), (L, 3, 7, 7), np.float32, True),
        ((1, 32, 12, 12), (2 * L, 32, 3, 3), np.float32, True),
        ((1, 65, 12, 12), (L, 65, 3, 3), np.float32, False),      # 585 taps > MAX_TAPS
        ((1, 8, 12, 12), (L + 1, 8, 3, 3), np.float32, False),    # K not in whole blocks
        ((1, 8, 12, 12), (L, 8, 1, 1), np.float32, False),        # 1×1: a GEMM on x itself
        ((1, 8, 12, 12), (L, 8, 3, 3), np.float64, False),        # float64: the GEMM rungs
        ((1, 8, 12, R - 1), (L, 8, 3, 3), np.float32, False),     # rows shorter than a block
        ((1, 64, 81, 81), (64, 64, 3, 3), np.float32, False),     # where Winograd pays
    ]
    for x_shape, w_shape, dtype, taken in cases:
        calls.clear()
        x = rng.standard_normal(x_shape).astype(dtype)
        w = rng.standard_normal(w_shape).astype(dtype)
        atrous_conv.conv2d_forward(x, w, None, 1, 1, 1, variant="cpu_v7")
        assert bool(calls) == taken, (x_shape, w_shape, dtype)
        Wo = atrous_conv.output_size(*x_shape[2:], *w_shape[2:], (1, 1), (1, 1), (1, 1))[1]
        winograd = atrous_conv.winograd_pays(x_shape, w_shape, (1, 1), (1, 1), (1, 1), 4,
                                             "winograd_cl4")
        assert (direct.pays(w_shape, np.dtype(dtype), Wo) and not winograd) == taken


def torch_weight_gradient(x, w_shape, dy, stride, padding, dilation):
    xt = torch.tensor(x, dtype=torch.float64)
    wt = torch.zeros(w_shape, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv2d(xt, wt, None, stride, padding, dilation)
    y.backward(torch.tensor(dy, dtype=torch.float64))
    return wt.grad.numpy()


@pytest.mark.parametrize("block", ["simd", "plain"])
@pytest.mark.parametrize("shape, K, kh, stride, padding, dilation", [
    ((4, 3, 161, 161), 16, 7, 2, 3, 1),   # the tiny network's stem
    ((1, 3, 67, 50), 64, 7, 2, 3, 1),     # ResNet's stem, odd sizes
    ((2, 5, 19, 23), 2 * L, 3, (1, 2), (0, 4), (2, 1)),  # 3×7 kernel rows, mixed everything
    ((3, 1, 12, 30), L, 1, 3, 2, (1, 3)),  # 1×7, dilated rows
])
def test_stem_weight_gradient_matches_torch(block, shape, K, kh, stride, padding, dilation):
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    rng = np.random.default_rng(sum(shape) + K)
    x = rng.standard_normal(shape).astype(np.float32)
    w_shape = (K, shape[1], kh, R)
    Ho, Wo = atrous_conv.output_size(*shape[2:], kh, R, stride, padding, dilation)
    dy = rng.standard_normal((shape[0], K, Ho, Wo)).astype(np.float32)
    ref = torch_weight_gradient(x, w_shape, dy, stride, padding, dilation)
    dw = direct.weight_gradient(x, dy, kh, stride, padding, dilation, block=block)
    assert dw.shape == w_shape and dw.dtype == np.float32
    assert_close_to_float64(dw, ref, f"{block} weight gradient")


def test_cpu_v7_takes_the_stems_weight_gradient_when_the_input_needs_none(monkeypatch):
    calls = spy_on(monkeypatch, "weight_gradient")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 33, 35)).astype(np.float32)
    w = rng.standard_normal((L, 3, 7, 7)).astype(np.float32)
    dy = rng.standard_normal((2, L, 17, 18)).astype(np.float32)
    ref = torch_weight_gradient(x, w.shape, dy, 2, 3, 1)
    dx, dw, db = atrous_conv.conv2d_backward(x, w, dy, 2, 3, 1, variant="cpu_v7",
                                             need_dx=False)
    assert dx is None and len(calls) == 1
    assert_close_to_float64(dw, ref, "cpu_v7 dw")
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2, 3)), rtol=1e-6)
    atrous_conv.conv2d_backward(x, w, dy, 2, 3, 1, variant="cpu_v7")  # dx wanted: the GEMMs
    dy5 = rng.standard_normal((2, L, 17, 19)).astype(np.float32)  # rows of 5 taps: the GEMMs
    atrous_conv.conv2d_backward(x, w[:, :, :, :5].copy(), dy5, 2, 3, 1, variant="cpu_v7",
                                need_dx=False)
    assert len(calls) == 1
    assert direct.weight_gradient_pays(w.shape, np.dtype(np.float32))
    assert not direct.weight_gradient_pays((L, 3, 7, 5), np.dtype(np.float32))
    assert not direct.weight_gradient_pays((L + 1, 3, 7, 7), np.dtype(np.float32))
    assert not direct.weight_gradient_pays(w.shape, np.dtype(np.float64))


@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 3)])
def test_adjoint_of_cpu_v7_forward_is_its_backward(stride, dilation):
    """<conv(x, w), dy> = <x, dx> = <w, dw> with the direct forward and cpu_v7's backward
    (cpu_v6's GEMM lowerings), float32."""
    rng = np.random.default_rng(stride * 10 + dilation)
    x = rng.standard_normal((2, 5, 23, 27)).astype(np.float32)
    w = rng.standard_normal((2 * L, 5, 3, 3)).astype(np.float32)
    y = atrous_conv.conv2d_forward(x, w, None, stride, dilation, dilation, variant="cpu_v7")
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, _ = atrous_conv.conv2d_backward(x, w, dy, stride, dilation, dilation,
                                            variant="cpu_v7")
    inner = float(np.dot(y.ravel().astype(np.float64), dy.ravel()))
    for name, a, da in (("x", x, dx), ("w", w, dw)):
        other = float(np.dot(a.ravel().astype(np.float64), da.ravel()))
        assert abs(inner - other) <= 1e-4 * abs(inner) + 1e-3, name


def test_bad_input_names_what_was_expected():
    x = np.zeros((1, 2, 9, 9), np.float32)
    with pytest.raises(ValueError, match="K a multiple of"):
        direct.forward(x, np.zeros((L + 1, 2, 3, 3), np.float32), None, (1, 1), (1, 1),
                       (1, 1))
    with pytest.raises(ValueError, match="float32"):
        direct.forward(x.astype(np.float64), np.zeros((L, 2, 3, 3)), None, (1, 1), (1, 1),
                       (1, 1))
    with pytest.raises(ValueError, match="block must be"):
        direct.forward(x, np.zeros((L, 2, 3, 3), np.float32), None, (1, 1), (1, 1), (1, 1),
                       block="fast")
    dy = np.zeros((1, L + 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="K a multiple of"):
        direct.weight_gradient(x, dy, 7, (1, 1), (0, 0), (1, 1))


def test_adjoint_of_the_stem_forward_is_the_direct_weight_gradient():
    """<conv(x, w), dy> = <w, dw> with dw by the direct rung (the input needs no gradient):
    the weight gradient is the forward's adjoint in w, float32, odd sizes."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 37, 41)).astype(np.float32)
    w = rng.standard_normal((L, 3, 7, 7)).astype(np.float32)
    y = atrous_conv.conv2d_forward(x, w, None, 2, 3, 1, variant="cpu_v7")
    dy = rng.standard_normal(y.shape).astype(np.float32)
    _, dw, _ = atrous_conv.conv2d_backward(x, w, dy, 2, 3, 1, variant="cpu_v7",
                                           need_dx=False)
    inner = float(np.dot(y.ravel().astype(np.float64), dy.ravel()))
    other = float(np.dot(w.ravel().astype(np.float64), dw.ravel()))
    assert abs(inner - other) <= 1e-4 * abs(inner) + 1e-3
