"""The ASPP head as one convolution (kernels/aspp.py): both variants against the float64
reference and PyTorch, forward and every gradient; finite differences; the taps left out;
bad input; the model's head computed either way."""
import numpy as np
import pytest

import tinydeeplab.functional as F
from conftest import CUDA_MODE, on_device, to_numpy
from helpers import torch
from test_atrous_conv import reference_conv2d
from tinydeeplab import Tensor, gradcheck
from tinydeeplab.kernels import aspp

CASES = [  # (N, C, H, W, K, rates, kernel): odd sizes, maps smaller than some rates
    (2, 5, 7, 9, 3, (1, 2, 6, 12), (3, 3)),
    (3, 6, 11, 13, 21, (6, 12, 18, 24), (3, 3)),
    (1, 4, 9, 8, 2, (2, 3), (3, 5)),
    (2, 3, 47, 50, 5, (1, 4, 9), (3, 3)),  # above CHUNK_MAX_PIXELS: one image at a time
]


def _case(N, C, H, W, K, rates, kernel, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    weights = [rng.standard_normal((K, C, *kernel)).astype(dtype) for _ in rates]
    biases = [rng.standard_normal(K).astype(dtype) for _ in rates]
    dy = rng.standard_normal((N, K, H, W)).astype(dtype)
    return x, weights, biases, dy


def _pads(kernel, rate):
    return rate * (kernel[0] - 1) // 2, rate * (kernel[1] - 1) // 2


def _torch_sum(x, weights, biases, dy, rates):
    xt = torch.tensor(x, requires_grad=True)
    wt = [torch.tensor(w, requires_grad=True) for w in weights]
    bt = [torch.tensor(b, requires_grad=True) for b in biases]
    y = sum(torch.nn.functional.conv2d(xt, w, b, padding=_pads(w.shape[2:], r), dilation=r)
            for w, b, r in zip(wt, bt, rates))
    y.backward(torch.tensor(dy))
    return (y.detach().numpy(), xt.grad.numpy(), [w.grad.numpy() for w in wt],
            [b.grad.numpy() for b in bt])


@pytest.mark.parametrize("variant", sorted(aspp.VARIANTS))
@pytest.mark.parametrize("case", CASES)
def test_variants_match_reference_and_torch(variant, case):
    *shape, rates, kernel = case
    x, weights, biases, dy = _case(*shape, rates, kernel)
    reference = sum(reference_conv2d(x, w, b, (1, 1), _pads(kernel, r), (r, r))
                    for w, b, r in zip(weights, biases, rates))
    y_t, dx_t, dws_t, dbs_t = _torch_sum(x, weights, biases, dy, rates)
    y = aspp.aspp_forward(x, weights, biases, rates, variant=variant)
    dx, dws, dbs = aspp.aspp_backward(x, weights, dy, rates, variant=variant)
    np.testing.assert_allclose(y, reference, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, y_t, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx, dx_t, rtol=1e-10, atol=1e-10)
    for dw, dw_t, db, db_t in zip(dws, dws_t, dbs, dbs_t):
        np.testing.assert_allclose(dw, dw_t, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(db, db_t, rtol=1e-10, atol=1e-10)


def test_float32_stacked_within_rounding_of_the_branch_sum():
    x, weights, biases, dy = _case(2, 64, 21, 21, 21, (6, 12, 18, 24), (3, 3), np.float32)
    y0 = aspp.aspp_forward(x, weights, biases, variant="sum")
    y1 = aspp.aspp_forward(x, weights, biases, variant="stacked")
    assert y1.dtype == np.float32
    assert np.abs(y1 - y0).max() <= 1e-5 * np.abs(y0).max()
    (dx0, dws0, _), (dx1, dws1, _) = (aspp.aspp_backward(x, weights, dy, variant=v)
                                      for v in ("sum", "stacked"))
    assert np.abs(dx1 - dx0).max() <= 1e-5 * np.abs(dx0).max()
    for a, b in zip(dws0, dws1):
        assert np.abs(b - a).max() <= 1e-5 * np.abs(a).max()


def test_taps_reading_only_padding_are_left_out():
    shapes = [(21, 8, 3, 3)] * 4
    taps = aspp.live_taps(shapes, (6, 12, 18, 24), 21, 21)
    # rates 6, 12, 18 are below 21: all 9 taps of those branches read the map; at rate 24
    # only the centre tap does
    assert len(taps) == 28
    assert [t[:3] for t in taps if t[0] == 3] == [(3, 1, 1)]
    # a non-square map: rows of 30, columns of 10 — rate 12 keeps its middle column only
    taps = aspp.live_taps([(21, 8, 3, 3)], (12,), 30, 10)
    assert sorted((p, q) for _, p, q, _, _ in taps) == [(0, 1), (1, 1), (2, 1)]


def test_left_out_taps_get_exactly_zero_gradient():
    x, weights, biases, dy = _case(2, 3, 9, 9, 4, (2, 12), (3, 3))
    _, dws, _ = aspp.aspp_backward(x, weights, dy, (2, 12), variant="stacked")
    centre = dws[1][:, :, 1, 1].copy()
    dws[1][:, :, 1, 1] = 0
    assert np.all(dws[1] == 0) and np.abs(centre).max() > 0


def test_need_dx_false_and_no_biases():
    x, weights, _, dy = _case(2, 4, 10, 11, 3, (1, 5), (3, 3))
    for variant in aspp.VARIANTS:
        y = aspp.aspp_forward(x, weights, None, (1, 5), variant=variant)
        y_ref = aspp.aspp_forward(x, weights, [np.zeros(3)] * 2, (1, 5), variant="sum")
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        dx, dws, _ = aspp.aspp_backward(x, weights, dy, (1, 5), variant=variant, need_dx=False)
        _, dws_full, _ = aspp.aspp_backward(x, weights, dy, (1, 5), variant=variant)
        assert dx is None
        for a, b in zip(dws, dws_full):  # "sum" takes cpu_v3's weights-only path: rounding
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_one_image_too_large_for_the_buffer_goes_branch_by_branch(monkeypatch):
    x, weights, biases, dy = _case(2, 3, 12, 12, 4, (1, 2), (3, 3))
    calls = []
    monkeypatch.setattr(aspp, "_sum_forward",
                        lambda *a: calls.append("forward") or aspp.VARIANTS["sum"][0](*a))
    monkeypatch.setitem(aspp.atrous_conv.COLS_BUDGET_BYTES, "cpu", 1000)
    y = aspp.aspp_forward(x, weights, biases, (1, 2), variant="stacked")
    assert calls == ["forward"]
    np.testing.assert_allclose(y, aspp.aspp_forward(x, weights, biases, (1, 2), variant="sum"),
                               rtol=1e-12, atol=1e-12)


def test_aspp_conv2d_gradcheck():
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((2, 3, 6, 7)), requires_grad=True)
    ws = [Tensor(rng.standard_normal((2, 3, 3, 3)), requires_grad=True) for _ in range(3)]
    bs = [Tensor(rng.standard_normal(2), requires_grad=True), None,
          Tensor(rng.standard_normal(2), requires_grad=True)]

    def fn(x, w0, w1, w2, b0, b2):
        return F.aspp_conv2d(x, [w0, w1, w2], [b0, None, b2], (1, 2, 6))

    assert gradcheck(fn, [x, *ws, bs[0], bs[2]])


def test_model_head_the_same_either_way():
    from tinydeeplab.models import ASPP

    rng = np.random.default_rng(0)
    head = ASPP(16, 5, seed=2)
    x = rng.standard_normal((2, 16, 13, 13)).astype(np.float32)
    outputs, grads = [], []
    for stacked in (True, False):
        head.stacked = stacked
        head.zero_grad()
        xt = Tensor(x.copy(), requires_grad=True)
        y = head(xt)
        y.backward(np.ones(y.shape, np.float32))
        outputs.append(y.numpy())
        grads.append([xt.grad] + [p.grad for p in head.parameters()])
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": []}, r"at least one branch"),
    ({"rates": (6, 12)}, r"one rate per branch"),
    ({"rates": (6, 12, 0)}, r"rates\[2\] must be an int ≥ 1"),
    ({"rates": (6, 12, 1.5)}, r"rates\[2\] must be an int"),
    ({"biases": [None]}, r"biases must be None or one per branch"),
    ({"weights": "even"}, r"even kernel"),
    ({"weights": "mismatch"}, r"weights\[1\] has shape .* every branch"),
    ({"weights": "float64"}, r"float32 or both float64"),
    ({"x": np.zeros((4, 8, 8), np.float32)}, r"x must be 4-D"),
])
def test_bad_input_gives_a_clear_value_error(kwargs, message):
    x = np.zeros((1, 4, 8, 8), np.float32)
    weights = [np.zeros((3, 4, 3, 3), np.float32) for _ in range(3)]
    given = {"x": x, "weights": weights, "biases": None, "rates": (6, 12, 18), **kwargs}
    if given["weights"] == "even":
        given["weights"] = [np.zeros((3, 4, 2, 2), np.float32)] * 3
    elif given["weights"] == "mismatch":
        given["weights"] = [weights[0], np.zeros((5, 4, 3, 3), np.float32), weights[2]]
    elif given["weights"] == "float64":
        given["weights"] = [w.astype(np.float64) for w in weights]
    with pytest.raises(ValueError, match=message):
        aspp.aspp_forward(given["x"], given["weights"], given["biases"], given["rates"])
    with pytest.raises(ValueError, match="variant must be one of"):
        aspp.aspp_forward(x, weights, None, (6, 12, 18), variant="fused")
    with pytest.raises(ValueError, match=r"dy has shape .* expected \(1, 3, 8, 8\)"):
        aspp.aspp_backward(x, weights, np.zeros((1, 3, 7, 8), np.float32), (6, 12, 18))


def test_tensor_arguments_are_checked():
    x = Tensor(np.zeros((1, 2, 5, 5), np.float32))
    w = Tensor(np.zeros((3, 2, 3, 3), np.float32))
    with pytest.raises(TypeError, match=r"weights\[0\] must be a Tensor"):
        F.aspp_conv2d(x, [w.data], [None], (2,))
    with pytest.raises(TypeError, match=r"biases\[0\] must be a Tensor or None"):
        F.aspp_conv2d(x, [w], [np.zeros(3, np.float32)], (2,))


def test_on_the_gpu_the_sum_variant_matches_the_cpu():
    if CUDA_MODE != "gpu":
        pytest.skip("no GPU visible to CuPy: the ASPP's CUDA path is the branch sum of "
                    "cuda_v4's convolutions, tested in test_atrous_conv on the simulator")
    x, weights, biases, dy = _case(2, 6, 11, 13, 5, (6, 12, 18, 24), (3, 3))
    y = aspp.aspp_forward(on_device(x, "cuda"), [on_device(w, "cuda") for w in weights],
                          [on_device(b, "cuda") for b in biases])
    dx, dws, _ = aspp.aspp_backward(on_device(x, "cuda"), [on_device(w, "cuda") for w in weights],
                                    on_device(dy, "cuda"))
    y_t, dx_t, dws_t, _ = _torch_sum(x, weights, biases, dy, (6, 12, 18, 24))
    np.testing.assert_allclose(to_numpy(y), y_t, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(to_numpy(dx), dx_t, rtol=1e-9, atol=1e-9)
    for a, b in zip(dws, dws_t):
        np.testing.assert_allclose(to_numpy(a), b, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="CPU only"):
        aspp.aspp_forward(on_device(x, "cuda"), [on_device(w, "cuda") for w in weights],
                          None, variant="stacked")


@pytest.mark.skipif(CUDA_MODE == "gpu", reason="simulated_gpu() is for machines without a GPU")
def test_on_the_simulated_gpu_the_head_takes_the_cuda_convolutions():
    from tinydeeplab import backend

    x, weights, biases, dy = _case(1, 2, 5, 6, 2, (1, 2), (3, 3))
    y_cpu = aspp.aspp_forward(x, weights, biases, (1, 2))
    dx_cpu, dws_cpu, _ = aspp.aspp_backward(x, weights, dy, (1, 2))
    with backend.simulated_gpu():
        y = aspp.aspp_forward(x, weights, biases, (1, 2))
        dx, dws, _ = aspp.aspp_backward(x, weights, dy, (1, 2))
        with pytest.raises(ValueError, match="CPU only"):
            aspp.aspp_forward(x, weights, biases, (1, 2), variant="stacked")
    np.testing.assert_allclose(y, y_cpu, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx, dx_cpu, rtol=1e-10, atol=1e-10)
    for a, b in zip(dws, dws_cpu):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_image_chunks_bound_both_buffers():
    mb = 1 << 20
    budget = aspp.atrous_conv.COLS_BUDGET_BYTES["cpu"]
    # 21² maps: as many images as keep the larger buffer (here x's 2048 channels) in budget
    step = budget // (2048 * 441 * 4)
    assert aspp._image_chunks(40, 21, 21, 588, 2048, 4)[0] == (0, min(40, step))
    assert aspp._image_chunks(3, 21, 21, 588, 128, 4) == [(0, 3)]
    assert aspp._image_chunks(3, 50, 50, 588, 128, 4) == [(0, 1), (1, 2), (2, 3)]  # large maps
    assert aspp._image_chunks(1, 500, 500, 756, 2048, 4) is None  # 756 planes of 1 MB: > 64 MB
    assert budget == 64 * mb


def test_several_chunks_of_images_give_the_branch_sum(monkeypatch):
    x, weights, biases, dy = _case(5, 6, 9, 8, 3, (1, 2, 6), (3, 3))
    rows = len(aspp.live_taps([w.shape for w in weights], (1, 2, 6), 9, 8)) * 3  # 27 taps
    y0 = aspp.aspp_forward(x, weights, biases, (1, 2, 6), variant="sum")
    dx0, dws0, _ = aspp.aspp_backward(x, weights, dy, (1, 2, 6), variant="sum")
    monkeypatch.setitem(aspp.atrous_conv.COLS_BUDGET_BYTES, "cpu", 2 * rows * 72 * 8)
    assert aspp._image_chunks(5, 9, 8, rows, 6, 8) == [(0, 2), (2, 4), (4, 5)]
    monkeypatch.setattr(aspp, "_sum_forward", None)  # the stacked path must not fall back
    monkeypatch.setattr(aspp, "_sum_backward", None)
    y = aspp.aspp_forward(x, weights, biases, (1, 2, 6), variant="stacked")
    dx, dws, _ = aspp.aspp_backward(x, weights, dy, (1, 2, 6), variant="stacked")
    np.testing.assert_allclose(y, y0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx0, rtol=1e-12, atol=1e-12)
    for a, b in zip(dws, dws0):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
