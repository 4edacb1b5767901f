"""The direct convolution rung (kernels/atrous_conv_direct.py, cpu_v7's forward for small
layers): both blocks against the float64 reference and PyTorch on odd shapes, the rule that
picks it, its adjoint against cpu_v7's backward, and bad input."""
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


def test_cpu_v7_takes_the_rung_exactly_where_it_pays(monkeypatch):
    calls = []
    real = direct.forward

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(direct, "forward", spy)
    rng = np.random.default_rng(0)
    cases = [  # (x shape, w shape, dtype, taken)
        ((2, 3, 30, 30), (L, 3, 7, 7), np.float32, True),
        ((1, 32, 12, 12), (2 * L, 32, 3, 3), np.float32, True),
        ((1, 33, 12, 12), (L, 33, 3, 3), np.float32, False),      # 297 taps > MAX_TAPS
        ((1, 8, 12, 12), (L + 1, 8, 3, 3), np.float32, False),    # K not in whole blocks
        ((1, 8, 12, 12), (L, 8, 1, 1), np.float32, False),        # 1×1: a GEMM on x itself
        ((1, 8, 12, 12), (L, 8, 3, 3), np.float64, False),        # float64: the GEMM rungs
        ((1, 8, 12, R - 1), (L, 8, 3, 3), np.float32, False),     # rows shorter than a block
    ]
    for x_shape, w_shape, dtype, taken in cases:
        calls.clear()
        x = rng.standard_normal(x_shape).astype(dtype)
        w = rng.standard_normal(w_shape).astype(dtype)
        atrous_conv.conv2d_forward(x, w, None, 1, 1, 1, variant="cpu_v7")
        assert bool(calls) == taken, (x_shape, w_shape, dtype)
        Wo = atrous_conv.output_size(*x_shape[2:], *w_shape[2:], (1, 1), (1, 1), (1, 1))[1]
        assert direct.pays(w_shape, np.dtype(dtype), Wo) == taken


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
