"""Atrous convolution: every variant against a float64 NumPy reference and PyTorch, forward and
all three gradients; finite differences and the adjoint identity; bad input; bounded memory."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinydeeplab.functional as F
from conftest import CUDA_MODE, on_device, to_numpy
from helpers import torch
from tinydeeplab import Tensor, gradcheck
from tinydeeplab.kernels import atrous_conv

CPU_VARIANTS = [v for v, spec in atrous_conv.VARIANTS.items() if spec.device == "cpu"]
CUDA_VARIANTS = [v for v, spec in atrous_conv.VARIANTS.items() if spec.device == "cuda"]


def reference_conv2d(x, w, b, stride, padding, dilation):
    """float64 NumPy loop over kernel taps: y += w[:, :, p, q] · (strided, shifted x)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xpad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = np.zeros((N, K, Ho, Wo))
    for p in range(kh):
        for q in range(kw):
            window = xpad[:, :, p * dh: p * dh + sh * (Ho - 1) + 1: sh,
                          q * dw: q * dw + sw * (Wo - 1) + 1: sw]
            y += np.einsum("kc,nchw->nkhw", w[:, :, p, q].astype(np.float64), window)
    if b is not None:
        y += b.reshape(1, K, 1, 1)
    return y


def torch_conv2d(x, w, b, dy, stride, padding, dilation):
    """PyTorch's y and (dx, dw, db) for the same float64 inputs."""
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    y = torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=padding,
                                   dilation=dilation)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy()


@st.composite
def conv_case(draw, max_n=3, max_c=4, max_hw=12):
    """A valid (x, w, b, stride, padding, dilation) with odd and non-square sizes."""
    N, C, K = draw(st.integers(1, max_n)), draw(st.integers(1, max_c)), draw(st.integers(1, 5))
    kh, kw = draw(st.sampled_from([1, 3, 5, 2])), draw(st.sampled_from([1, 3, 5]))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    padding = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
    # input at least as large as the dilated kernel minus the padding, so the output is ≥ 1
    h_min = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    w_min = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    H = draw(st.integers(h_min, max(h_min, max_hw)))
    W = draw(st.integers(w_min, max(w_min, max_hw)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((K, C, kh, kw))
    b = rng.standard_normal(K)
    return x, w, b, stride, padding, dilation


def check_variant(variant, case, dtype=np.float64):
    x, w, b, stride, padding, dilation = case
    device = atrous_conv.VARIANTS[variant].device
    y_ref = reference_conv2d(x, w, b, stride, padding, dilation)
    dy = np.random.default_rng(7).standard_normal(y_ref.shape)
    y_t, dx_t, dw_t, db_t = torch_conv2d(x, w, b, dy, stride, padding, dilation)
    np.testing.assert_allclose(y_t, y_ref, atol=1e-10)  # the two oracles agree

    args = [on_device(a.astype(dtype), device) for a in (x, w, b, dy)]
    y = to_numpy(atrous_conv.conv2d_forward(*args[:3], stride, padding, dilation,
                                            variant=variant))
    grads = atrous_conv.conv2d_backward(args[0], args[1], args[3], stride, padding, dilation,
                                        variant=variant)
    dx, dw, db = (to_numpy(g) for g in grads)
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == dtype
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == np.float64 else dict(atol=2e-4, rtol=2e-4)
    scale = lambda a: max(1.0, np.abs(a).max())  # noqa: E731  float32 sums of many terms
    for name, ours, ref in (("y", y, y_ref), ("dx", dx, dx_t), ("dw", dw, dw_t),
                            ("db", db, db_t)):
        np.testing.assert_allclose(ours / scale(ref), ref / scale(ref), **tol,
                                   err_msg=f"{variant} {name} differs from the reference")


@pytest.mark.parametrize("variant", CPU_VARIANTS)
@settings(max_examples=40, deadline=None)
@given(case=conv_case())
def test_cpu_variants_match_reference_and_torch(variant, case):
    check_variant(variant, case)


@pytest.mark.parametrize("variant", sorted(atrous_conv.VARIANTS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, stride, padding, dilation", [
    ((2, 3, 5, 6, 4, 3, 2), (2, 1), (3, 1), (2, 3)),   # N C H W K kh kw, non-square everything
    ((1, 2, 4, 3, 3, 3, 3), (1, 1), (5, 5), (5, 5)),   # dilation larger than the input
    ((2, 3, 3, 5, 2, 1, 1), (1, 1), (0, 0), (1, 1)),   # 1×1: the no-im2col path
    ((1, 1, 1, 1, 1, 1, 1), (1, 1), (0, 0), (1, 1)),   # everything 1
])
def test_every_variant_on_fixed_cases(variant, dtype, shape, stride, padding, dilation):
    """The parametrised test over the whole VARIANTS registry (CUDA ones under the simulator
    when there is no GPU), float64 and float32."""
    N, C, H, W, K, kh, kw = shape
    rng = np.random.default_rng(sum(shape))
    case = (rng.standard_normal((N, C, H, W)), rng.standard_normal((K, C, kh, kw)),
            rng.standard_normal(K), stride, padding, dilation)
    check_variant(variant, case, dtype)


@pytest.mark.parametrize("variant", CUDA_VARIANTS)
@settings(max_examples=4 if CUDA_MODE == "simulator" else 40, deadline=None)
@given(case=conv_case(max_n=2, max_c=2, max_hw=6))
def test_cuda_variants_on_random_tiny_shapes(variant, case):
    check_variant(variant, case)


@pytest.mark.parametrize("dilation", [4, 24])
def test_deeplab_case_padding_equal_to_dilation_keeps_the_size(dilation):
    """DeepLab v2: a 3×3 kernel with padding = dilation and stride 1 keeps H×W."""
    rng = np.random.default_rng(dilation)
    x = rng.standard_normal((5, 8, 56, 128)).astype(np.float32)
    w = rng.standard_normal((33, 8, 3, 3)).astype(np.float32)
    y = atrous_conv.conv2d_forward(x, w, None, 1, dilation, dilation)
    assert y.shape == (5, 33, 56, 128)
    yt = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), padding=dilation,
                                    dilation=dilation).numpy()
    np.testing.assert_allclose(y, yt, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_adjoint_identity(variant):
    """<conv(x), y> == <x, convᵀ(y)>: the backward w.r.t. x is the transpose of the forward."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 9, 7))
    w = rng.standard_normal((4, 3, 3, 2))
    args = ((2, 1), (2, 3), (3, 2))
    Ax = atrous_conv.conv2d_forward(x, w, None, *args, variant=variant)
    y = rng.standard_normal(Ax.shape)
    ATy, _, _ = atrous_conv.conv2d_backward(x, w, y, *args, variant=variant)
    assert np.vdot(Ax, y) == pytest.approx(np.vdot(x, ATy), rel=1e-12)
    # and linearity in w the same way: <conv_x(w), y> == <w, dw(y)>
    _, dw, _ = atrous_conv.conv2d_backward(x, w, y, *args, variant=variant)
    assert np.vdot(Ax, y) == pytest.approx(np.vdot(w, dw), rel=1e-12)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 2, 2), ((2, 1), (1, 3), (1, 3)),
                                                       (1, 0, 1)])
def test_functional_conv2d_gradcheck(stride, padding, dilation):
    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((2, 2, 5, 6)), requires_grad=True)
    w = Tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    b = Tensor(rng.standard_normal(3), requires_grad=True)
    assert gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation), [x, w, b])


def test_functional_conv2d_float32_and_without_bias():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((1, 2, 5, 5)).astype(np.float32), requires_grad=True)
    w = Tensor(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), requires_grad=True)
    y = F.conv2d(x, w, padding=2, dilation=2)
    assert y.shape == (1, 3, 5, 5) and y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32 and w.grad.shape == (3, 2, 3, 3)


@pytest.mark.parametrize("x_shape, w_shape, kwargs, message", [
    ((2, 3, 8), (4, 3, 3, 3), {}, r"x must be 4-D .*\(2, 3, 8\)"),
    ((1, 3, 8, 8), (4, 3, 3), {}, r"w must be 4-D"),
    ((1, 3, 8, 8), (4, 2, 3, 3), {}, r"channel mismatch.*C=3.*C=2"),
    ((1, 3, 8, 8), (4, 3, 3, 3), {"stride": 0}, r"stride must be positive"),
    ((1, 3, 8, 8), (4, 3, 3, 3), {"dilation": (1, -2)}, r"dilation must be positive"),
    ((1, 3, 8, 8), (4, 3, 3, 3), {"padding": -1}, r"padding must be non-negative"),
    ((1, 3, 8, 8), (4, 3, 3, 3), {"dilation": 5}, r"output size .*\(1, 3, 8, 8\).*dilation"),
    ((1, 3, 8, 8), (4, 3, 3, 3), {"stride": 1.5}, r"stride must be an int"),
])
def test_bad_input_gives_a_clear_value_error(x_shape, w_shape, kwargs, message):
    x = np.zeros(x_shape, dtype=np.float32)
    w = np.zeros(w_shape, dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        atrous_conv.conv2d_forward(x, w, None, **kwargs)
    if len(x_shape) == 4 and len(w_shape) == 4:
        with pytest.raises(ValueError, match=message):
            F.conv2d(Tensor(x), Tensor(w), **kwargs)


def test_mixed_dtypes_and_bad_dy_are_rejected():
    x = np.zeros((1, 2, 5, 5), dtype=np.float32)
    w = np.zeros((3, 2, 3, 3), dtype=np.float64)
    with pytest.raises(ValueError, match="float32 or both float64"):
        atrous_conv.conv2d_forward(x, w)
    with pytest.raises(ValueError, match=r"dy has shape .* expected \(1, 3, 3, 3\)"):
        atrous_conv.conv2d_backward(x, w.astype(np.float32), np.zeros((1, 3, 5, 5), np.float32))


@pytest.mark.parametrize("variant", ["cpu_v2", "cpu_v3", "cpu_v4", "cpu_v5", "cpu_v6",
                                     "cpu_v7"])
def test_lowering_buffers_are_bounded_for_a_large_layer(variant, monkeypatch):
    """A 1024-channel 65×65 3×3 layer would need 156 MB of im2col columns; chunks stay within
    the budget, forward and backward, and give the same answer as PyTorch."""
    requested = []
    original = atrous_conv._Workspace.get

    def recording(self, name, shape, dtype, xp):
        requested.append(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        return original(self, name, shape, dtype, xp)

    monkeypatch.setattr(atrous_conv._Workspace, "get", recording)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1024, 65, 65), dtype=np.float32)
    w = rng.standard_normal((6, 1024, 3, 3), dtype=np.float32) * 0.01  # few filters: fast
    dy = rng.standard_normal((1, 6, 65, 65), dtype=np.float32)
    y = atrous_conv.conv2d_forward(x, w, None, 1, 2, 2, variant=variant)
    dx, dw, _ = atrous_conv.conv2d_backward(x, w, dy, 1, 2, 2, variant=variant)
    assert requested and max(requested) <= atrous_conv.COLS_BUDGET_BYTES["cpu"]
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    yt = torch.nn.functional.conv2d(xt, wt, padding=2, dilation=2)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(dw, wt.grad.numpy(), atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("shape, w_shape, stride, padding, piece_bytes, pieces_expected", [
    ((4, 3, 161, 161), (16, 3, 7, 7), 2, 3, None, 4),  # the tiny model's stem: an image a piece
    ((3, 16, 41, 41), (16, 16, 3, 3), 2, 1, None, 1),  # all three images fit in one piece
    ((1, 64, 81, 81), (64, 64, 3, 3), 1, 1, None, 1),  # one image is larger: not cut into rows
    # stride 2, K > C (im2col and col2im), pieces shrunk to one image's 45 × 31² columns
    ((3, 5, 61, 61), (32, 5, 3, 3), 2, 1, 45 * 31 * 31 * 4, 3),
])
def test_cache_sized_pieces_give_the_same_bits(shape, w_shape, stride, padding, piece_bytes,
                                               pieces_expected, monkeypatch):
    """PIECE_BYTES takes im2col's images a few at a time so that the GEMMs find the
    columns in cache: in the forward, in the weight gradient alone (the stem's) and in the
    col2im backward.  The GEMMs are per image either way and dw sums them in image order, so
    no result may change by a bit (training runs recorded before stay reproducible).  Rows
    are never cut for it: that changes OpenBLAS's summation order (3 % of a 64-channel 81²
    layer's outputs moved)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    if piece_bytes is not None:
        monkeypatch.setattr(atrous_conv, "PIECE_BYTES", piece_bytes)
    pieces = []
    original = atrous_conv.plan_chunks
    monkeypatch.setattr(atrous_conv, "plan_chunks",
                        lambda *args: pieces.append(list(original(*args))) or iter(pieces[-1]))

    def run():
        y = atrous_conv.conv2d_forward(x, w, None, stride, padding, 1, variant="cpu_v3")
        dy = np.random.default_rng(6).standard_normal(y.shape).astype(np.float32)
        grads = atrous_conv.conv2d_backward(x, w, dy, stride, padding, 1, variant="cpu_v3")
        dw_alone = atrous_conv.conv2d_backward(x, w, dy, stride, padding, 1,
                                               variant="cpu_v3", need_dx=False)
        return y, *grads, *dw_alone[1:]

    cut = run()
    planned = len(pieces)
    monkeypatch.setattr(atrous_conv, "PIECE_BYTES", 1 << 40)
    whole = run()
    assert len(pieces[0]) == pieces_expected and len(pieces[planned]) == 1
    if stride == 2:  # the backward's im2col was cut into the same pieces
        assert [len(p) for p in pieces[:planned]] == [pieces_expected] * planned
    for a, b in zip(cut, whole):
        np.testing.assert_array_equal(a, b)


def test_same_width_im2col_equals_the_row_by_row_one():
    """Where the output is as wide as the input's phase planes (stride 1 with Wo == W, stride s
    with Wo = ⌈W / s⌉) im2col takes the shifted-plane copy (``_im2col_same_width``); it must
    write exactly what the row-by-row ``im2col_rows`` writes, for any stride, padding,
    dilation, kernel size and chunk of output rows, including shifts wider than the plane."""
    from tinydeeplab.kernels import atrous_conv_cpu as cpu

    rng = np.random.default_rng(3)
    checked, strided = 0, 0
    while checked < 200:
        N, C, H, W = (int(v) for v in rng.integers(1, [4, 4, 12, 12], endpoint=True))
        kh, kw = int(rng.choice([1, 2, 3, 5, 7])), int(rng.choice([1, 3, 5, 7]))
        dh, dw = (int(v) for v in rng.integers(1, 7, 2))
        sh, sw = (int(v) for v in rng.choice([1, 1, 2, 3], 2))
        ph = int(rng.integers(0, 8))
        Wq = -(-W // sw)
        pads = [p for p in range(12) if (W + 2 * p - dw * (kw - 1) - 1) // sw + 1 == Wq]
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        if not pads or Ho < 1:
            continue  # no padding gives the planes' width, or no output row
        pw = pads[0]
        r0 = int(rng.integers(0, Ho))
        r1 = int(rng.integers(r0 + 1, Ho + 1))
        x = rng.standard_normal((N, C, H, W)).astype(np.float32)
        rowwise = np.full((C * kh * kw, N * (r1 - r0) * Wq), np.nan, np.float32)
        shifted = rowwise.copy()
        args = ((1, C, kh, kw), (sh, sw), (ph, pw), (dh, dw), r0, r1, Wq)
        cpu.im2col_rows(x, *args, rowwise)
        cpu.im2col_dilated(x, *args, shifted)
        np.testing.assert_array_equal(shifted, rowwise, err_msg=str((x.shape, args)))
        checked += 1
        strided += (sh, sw) != (1, 1)
    assert strided > 50


def test_chunk_plan_covers_every_row_once():
    for N, Ho, row_bytes, budget in [(3, 7, 10, 25), (5, 4, 10, 100), (2, 9, 100, 50)]:
        seen = np.zeros((N, Ho), dtype=int)
        for n0, n1, r0, r1 in atrous_conv.plan_chunks(N, Ho, row_bytes, budget):
            seen[n0:n1, r0:r1] += 1
        assert (seen == 1).all()


@pytest.mark.parametrize("variant", sorted(atrous_conv.VARIANTS))
@pytest.mark.parametrize("stride, padding, kernel", [(2, 0, 1), (1, 2, 3), (2, 3, 7)])
def test_weights_only_backward_equals_full_backward(variant, stride, padding, kernel):
    """need_dx=False (an input needing no gradient) gives the same dw and db, and no dx;
    covers the strided 1×1 shortcut path too."""
    rng = np.random.default_rng(kernel)
    dev = atrous_conv.VARIANTS[variant].device
    tiny = dev == "cuda" and CUDA_MODE == "simulator"
    x = on_device(rng.standard_normal((1, 2, 5, 4) if tiny else (2, 3, 9, 8)), dev)
    w = on_device(rng.standard_normal((2 if tiny else 4, x.shape[1], kernel, kernel)), dev)
    y = atrous_conv.conv2d_forward(x, w, None, stride, padding, 1, variant=variant)
    dy = on_device(rng.standard_normal(y.shape), dev)
    dx, dw, db = atrous_conv.conv2d_backward(x, w, dy, stride, padding, 1, variant=variant)
    none, dw2, db2 = atrous_conv.conv2d_backward(x, w, dy, stride, padding, 1, variant=variant,
                                                 need_dx=False)
    assert none is None
    np.testing.assert_allclose(to_numpy(dw2), to_numpy(dw), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(db2), to_numpy(db), rtol=1e-12, atol=1e-12)
    ref = reference_conv2d(to_numpy(x), to_numpy(w), None, (stride,) * 2, (padding,) * 2,
                           (1, 1))
    np.testing.assert_allclose(to_numpy(y), ref, atol=1e-10)


@pytest.mark.parametrize("shape, kernel", [((3, 4, 9, 11), (5, 4, 3, 3)),  # images batched
                                           ((3, 40, 9, 11), (2, 40, 3, 3)),  # C > 9K
                                           ((2, 3, 47, 50), (4, 3, 3, 3))])  # large images
def test_flipped_backward_batched_and_per_image_paths(shape, kernel):
    """cpu_v3's stride-1 backward takes one GEMM over several small images, or one per image
    (more input channels than column rows, or large images): both equal the loops."""
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal(shape), rng.standard_normal(kernel)
    dy = rng.standard_normal((shape[0], kernel[0], shape[2], shape[3]))
    ref = atrous_conv.conv2d_backward(x, w, dy, 1, 2, 2, variant="cpu_v1")
    got = atrous_conv.conv2d_backward(x, w, dy, 1, 2, 2, variant="cpu_v3")
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=1e-9)
