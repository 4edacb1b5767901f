"""The CRF's helper kernels: the vectorised float32 softmax (against float64 NumPy, extreme
logits, CUDA under the simulator) and the tiled transpose (odd sizes)."""
import numpy as np
import pytest
from conftest import on_device, to_numpy

from tinydeeplab.kernels.softmax import softmax_rows
from tinydeeplab.kernels.transpose import transpose


def softmax64(a):
    a = a.astype(np.float64)
    e = np.exp(a - a.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("shape", [(1, 1), (7, 21), (33, 5), (1000, 21), (65, 3), (9, 8), (40, 13), (5, 16)])
def test_float32_softmax_matches_float64(shape):
    rng = np.random.default_rng(sum(shape))
    a = (rng.normal(0, 8, shape)).astype(np.float32)
    out = softmax_rows(a, np.empty_like(a))
    np.testing.assert_allclose(out, softmax64(a), rtol=2e-6, atol=1e-7)


def test_float32_exp_over_its_whole_range():
    from numba import njit

    from tinydeeplab.kernels.softmax import _exp_f32

    @njit
    def run(x, out):
        for i in range(x.size):
            out[i] = _exp_f32(x[i])

    x = np.linspace(-87.0, 0.0, 100_001).astype(np.float32)
    out = np.empty_like(x)
    run(x, out)
    rel = np.abs(out - np.exp(x.astype(np.float64))) / np.exp(x.astype(np.float64))
    assert rel.max() < 4e-7
    tiny = np.empty(1, np.float32)
    run(np.array([-1e30], np.float32), tiny)  # clamped, finite, ≥ 0
    assert 0 <= tiny[0] < 2e-38


def test_softmax_extreme_logits_and_in_place():
    a = np.array([[1e30, 0, -1e30], [-1e4, -1e4, -1e4 + 1], [0, 0, 0]], np.float32)
    out = softmax_rows(a.copy(), a)  # out may be the input
    np.testing.assert_allclose(out, [[1, 0, 0], [0.2119416, 0.2119416, 0.5761169],
                                     [1 / 3, 1 / 3, 1 / 3]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("C", [8, 10, 15, 16, 21, 24, 31, 32, 33, 43])
def test_softmax_extreme_logits_and_in_place_in_8_wide_steps(C):
    """Rows of ≥ 8 labels take the 8-wide paths: up to 32 labels the whole row in registers
    (1-4 steps, the last overlapping the one before unless 8 divides C: its lanes must count
    once in the sum); longer rows maximum, then exp and sum in one pass (the columns after
    the whole 8-wide steps in 4-, 2- and 1-wide steps, C = 33 and 43), then the scaling:
    huge, tiny and equal logits, in place, against float64."""
    rng = np.random.default_rng(C)
    a = rng.normal(0, 8, (6, C)).astype(np.float32)
    a[0, C - 1], a[0, 0] = 1e30, -1e30  # one label takes all: the last column, in the tail
    a[1] = -1e4
    a[1, C // 2] += 1
    a[2] = 0  # uniform
    a[3, :] = np.linspace(-200, 50, C)  # most exponents below exp's clamp
    expected = softmax64(a)
    out = softmax_rows(a, a)  # in place
    assert out is a
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(out.sum(1), 1, rtol=1e-6)


def test_float64_softmax_keeps_double_precision():
    a = np.random.default_rng(0).normal(0, 3, (37, 6))
    np.testing.assert_allclose(softmax_rows(a, np.empty_like(a)), softmax64(a), rtol=1e-13)


def test_cuda_softmax_equals_cpu():
    a = np.random.default_rng(1).normal(0, 5, (45, 7)).astype(np.float32)
    x = on_device(a, "cuda")
    gpu = to_numpy(softmax_rows(x, x.copy(), cuda=True))
    np.testing.assert_allclose(gpu, softmax_rows(a, np.empty_like(a)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(1, 1), (21, 187), (33, 65), (64, 64)])
def test_transpose(shape):
    a = np.random.default_rng(2).random(shape).astype(np.float32)
    np.testing.assert_array_equal(transpose(a), a.T)
    np.testing.assert_array_equal(transpose(a, -1.0), -a.T)
