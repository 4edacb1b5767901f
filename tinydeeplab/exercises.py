"""The checks of the lessons' exercises: each compares a function you write with the library
(or a reference) on random inputs and says what is wrong.

A lesson ends with a stub — ``def output_size(...): raise NotImplementedError`` — and
``exercises.run(exercises.check_output_size, output_size)``, which prints whether it is done
and right.  A check returns True when the function is right and raises AssertionError, with
a message, when it is not.  Solutions are in lessons/solutions/; the test suite runs every check
against its solution and against a plausible mistake.
"""
import numpy as np


def run(check, fn):
    """Run ``check(fn)`` and say how it went; returns whether ``fn`` is right (never raises:
    the lesson goes on either way)."""
    name = getattr(fn, "__name__", "your function")
    try:
        check(fn)
    except NotImplementedError:
        print(f"exercise: not done yet — write {name} and run this cell again")
        return False
    except AssertionError as error:
        print(f"exercise: {name} is not right yet — {error}")
        return False
    print(f"exercise: {name} is right")
    return True


def _close(got, expected, what, atol=1e-8):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    err = float(np.abs(got - expected).max()) if got.size else 0.0
    assert err <= atol * (1 + float(np.abs(expected).max(initial=0))), \
        f"{what}: largest difference {err:.3g}"


# ---- 01 ------------------------------------------------------------------------------------
def check_output_size(fn):
    """fn(H, k, s, pad, d): the output size of a dilated convolution, against the kernel's."""
    from tinydeeplab.kernels import atrous_conv

    rng = np.random.default_rng(1)
    for _ in range(40):
        k, s, d = int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(1, 5))
        pad = int(rng.integers(0, 2 * d + 1))
        H = int(rng.integers(d * (k - 1) + 1 - 2 * pad if d * (k - 1) + 1 > 2 * pad else 1, 40))
        y = atrous_conv.conv2d_forward(np.zeros((1, 1, H, H), np.float32),
                                       np.zeros((1, 1, k, k), np.float32), None, s, pad, d)
        got = fn(H, k, s, pad, d)
        assert got == y.shape[2], (f"H={H}, k={k}, s={s}, pad={pad}, d={d}: you say {got}, "
                                   f"the kernel makes {y.shape[2]}")
    return True


# ---- 02 ------------------------------------------------------------------------------------
def check_weight_gradient(fn):
    """fn(x, dy, kh, kw, s, pad, d) -> dw (K, C, kh, kw), against conv2d_backward's."""
    from tinydeeplab.kernels import atrous_conv

    rng = np.random.default_rng(2)
    for s, pad, d in ((1, 2, 2), (2, 1, 1), (1, 0, 3)):
        x = rng.standard_normal((2, 3, 11, 9))
        w = rng.standard_normal((4, 3, 3, 3))
        y = atrous_conv.conv2d_forward(x, w, None, s, pad, d)
        dy = rng.standard_normal(y.shape)
        _, dw, _ = atrous_conv.conv2d_backward(x, w, dy, s, pad, d)
        _close(fn(x, dy, 3, 3, s, pad, d), dw, f"dw with s={s}, pad={pad}, d={d}")
    return True


# ---- 03 ------------------------------------------------------------------------------------
def check_sigmoid_function(cls):
    """cls: a Function with forward σ(x) = 1/(1 + e^−x) and its backward."""
    from tinydeeplab import Tensor, gradcheck

    x = np.random.default_rng(3).standard_normal((4, 5)) * 3
    y = cls.apply(Tensor(x)).numpy()
    _close(y, 1 / (1 + np.exp(-x)), "forward")
    assert gradcheck(lambda t: cls.apply(t), [Tensor(x, requires_grad=True)],
                     raise_exception=False), "backward disagrees with finite differences"
    return True


# ---- 04 ------------------------------------------------------------------------------------
def check_stage_dilations(fn):
    """fn(output_stride) -> {"layer3": (first, rest), "layer4": (first, rest)}: the dilation of
    the stage's first block's 3×3 convolution and of the others', against models.ResNet."""
    from tinydeeplab import models, nn

    for os_ in (8, 16, 32):
        net = models.ResNet("resnet50", output_stride=os_, seed=0)
        for name in ("layer3", "layer4"):
            dils = [m.dilation for _, m in getattr(net, name).named_modules()
                    if isinstance(m, nn.Conv2d) and m.weight.shape[2:] == (3, 3)]
            expected = (dils[0], dils[1])
            got = tuple(fn(os_)[name])
            assert got == expected, (f"output stride {os_}, {name}: you say {got}, the network "
                                     f"has {expected}")
    return True


# ---- 05 ------------------------------------------------------------------------------------
def check_taps_inside(fn):
    """fn(size, rate) -> how many of a 3×3 kernel's 9 taps at `rate`, centred on the middle
    pixel of a size×size map, read inside the map (the others read padding)."""
    for size in (1, 5, 11, 17, 41, 65):
        for rate in (1, 2, 6, 12, 18, 24):
            c = size // 2
            expected = sum(0 <= c + dy * rate < size and 0 <= c + dx * rate < size
                           for dy in (-1, 0, 1) for dx in (-1, 0, 1))
            got = fn(size, rate)
            assert got == expected, f"size {size}, rate {rate}: you say {got}, it is {expected}"
    return True


# ---- 06 ------------------------------------------------------------------------------------
def check_resize_labels(fn):
    """fn(labels (B, H, W), (h, w)) -> nearest-neighbour labels, as train.downsample_labels
    (sampling at pixel centres: output pixel i reads input row ⌊(i + ½)·H/h⌋)."""
    from tinydeeplab.train import downsample_labels

    rng = np.random.default_rng(6)
    for H, W, h, w in ((161, 161, 21, 21), (50, 37, 7, 5), (9, 9, 9, 9), (8, 12, 3, 5)):
        labels = rng.choice([0, 1, 3, 255], size=(2, H, W)).astype(np.uint8)
        got = fn(labels, (h, w))
        expected = downsample_labels(labels, (h, w))
        assert np.asarray(got).shape == expected.shape, \
            f"{H}×{W} → {h}×{w}: shape {np.asarray(got).shape}, expected {expected.shape}"
        assert set(np.unique(got)) <= set(np.unique(labels)), "ids that were not in the labels"
        assert np.array_equal(got, expected), \
            f"{H}×{W} → {h}×{w}: {int((np.asarray(got) != expected).sum())} pixels differ"
    return True


# ---- 07 ------------------------------------------------------------------------------------
def check_splat(fn):
    """fn(lattice, values (N, c)) -> (M, c): each vertex's Σ weight · value, against the
    reference lattice's splat."""
    from tinydeeplab.kernels.permutohedral import reference

    rng = np.random.default_rng(7)
    for d in (1, 2, 3):
        lattice = reference.LatticeReference((rng.random((57, d)) * 4).astype(np.float32))
        values = rng.standard_normal((57, 3))
        _close(fn(lattice, values), lattice.splat(values), f"splat, d = {d}", atol=1e-10)
    return True


# ---- 08 ------------------------------------------------------------------------------------
def check_potts_message(fn):
    """fn(lattice, n, Q, weight) -> (N, C): a Potts kernel's message weight · n ⊙ K(n ⊙ Q),
    with n = 1/√(K·1) the symmetric normalisation; one mean-field iteration built with it
    must equal crf.DenseCRF2D's."""
    from tinydeeplab import crf

    rng = np.random.default_rng(8)
    H, W, C = 9, 13, 4
    image = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    probs = rng.dirichlet(np.ones(C), H * W).T.astype(np.float32)
    U = crf.unary_from_softmax(probs)  # (C, N)
    d = crf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(U)
    d.addPairwiseGaussian(sxy=2, compat=3)
    d.addPairwiseBilateral(sxy=5, srgb=20, rgbim=image, compat=4)
    expected = d.inference(1, engine="plain").T
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    pos = np.stack([xx.ravel(), yy.ravel()], 1)
    kernels = [(pos / 2, 3.0),
               (np.concatenate([pos / 5, image.reshape(-1, 3).astype(np.float32) / 20], 1), 4.0)]
    Q = np.exp(-U.T - (-U.T).max(1, keepdims=True))
    Q /= Q.sum(1, keepdims=True)
    A = -U.T.astype(np.float64)
    for features, weight in kernels:
        lattice = crf.PermutohedralLattice(features)
        n = 1 / np.sqrt(lattice.filter(np.ones(H * W, np.float32)))
        A = A + fn(lattice, n, Q, weight)
    A -= A.max(1, keepdims=True)
    got = np.exp(A) / np.exp(A).sum(1, keepdims=True)
    _close(got, expected, "Q after one iteration with your message", atol=1e-4)
    return True


# ---- 09 ------------------------------------------------------------------------------------
def check_poly_lr(fn):
    """fn(base_lr, iteration, max_iter, power=0.9) -> DeepLab's poly learning rate, against
    train.learning_rate."""
    from tinydeeplab.train import TrainConfig, learning_rate

    for base, max_iter in ((0.02, 600), (2.5e-4, 20000)):
        cfg = TrainConfig("unused", "unused", lr=base, iterations=max_iter)
        for it in (0, 1, max_iter // 3, max_iter // 2, max_iter - 1):
            _close(fn(base, it, max_iter), learning_rate(cfg, it), f"iteration {it} of {max_iter}",
                   atol=1e-12)
    return True


# ---- 10 ------------------------------------------------------------------------------------
def check_bilateral_weight(fn):
    """fn(p_i, p_j, I_i, I_j, sxy, srgb) -> exp(−|p_i − p_j|²/2sxy² − |I_i − I_j|²/2srgb²),
    the appearance kernel of Krähenbühl & Koltun (eq. 3), for one pair of pixels."""
    rng = np.random.default_rng(10)
    for _ in range(20):  # pairs at about a kernel width apart: weights well above 0
        sxy, srgb = rng.uniform(5, 80), rng.uniform(3, 30)
        p_i, I_i = rng.random(2) * 40, rng.random(3) * 255
        p_j, I_j = p_i + rng.normal(0, 0.7 * sxy, 2), I_i + rng.normal(0, 0.7 * srgb, 3)
        expected = np.exp(-((p_i - p_j) ** 2).sum() / (2 * sxy ** 2)
                          - ((I_i - I_j) ** 2).sum() / (2 * srgb ** 2))
        _close(fn(p_i, p_j, I_i, I_j, sxy, srgb), expected, "the weight", atol=1e-9)
    return True


# ---- 11 ------------------------------------------------------------------------------------
def check_batch_norm_backward(fn):
    """fn(x, gamma, g, eps) -> (dx, dgamma, dbeta) of training-mode batch norm, against
    autograd through F.batch_norm (float64)."""
    from tinydeeplab import Tensor
    from tinydeeplab import functional as F

    rng = np.random.default_rng(11)
    for shape in ((2, 3, 4, 5), (1, 2, 3, 3), (5, 1, 2, 7)):
        x = rng.standard_normal(shape) * 3 + 1
        gamma = rng.uniform(0.5, 2, shape[1])
        g = rng.standard_normal(shape)
        xt, gt = Tensor(x, requires_grad=True), Tensor(gamma, requires_grad=True)
        bt = Tensor(np.zeros(shape[1]), requires_grad=True)
        F.batch_norm(xt, np.zeros(shape[1]), np.ones(shape[1]), gt, bt, training=True,
                     eps=1e-5).backward(g)
        got = fn(x, gamma, g, 1e-5)
        assert isinstance(got, tuple) and len(got) == 3, "return (dx, dgamma, dbeta)"
        for value, expected, what in zip(got, (xt.grad, gt.grad, bt.grad),
                                         ("dx", "dgamma", "dbeta")):
            _close(value, expected, f"{what} for x of shape {shape}", atol=1e-9)
    return True


# ---- 12 ------------------------------------------------------------------------------------
def check_msc_fuse(fn):
    """fn(network, x, scales) -> fused logits (array or Tensor), against models.MSC's
    test-time output."""
    from tinydeeplab import Tensor, models, no_grad

    rng = np.random.default_rng(12)
    net = models.deeplab_v2(3, "tiny", 8, seed=1).eval()
    for size, scales in (((57, 65), (0.75, 0.5)), ((49, 49), (0.5,)), ((41, 73), (1.25, 0.75))):
        x = Tensor(rng.standard_normal((1, 3) + size).astype(np.float32))
        with no_grad():
            expected = models.MSC(net, scales).eval()(x).data
            got = fn(net, x, scales)
        got = getattr(got, "data", got)
        _close(got, expected, f"input {size[0]}×{size[1]}, scales {scales}", atol=1e-5)
    return True


# ---- 13 ------------------------------------------------------------------------------------
def check_move_backbone(fn):
    """fn(source_state, target) loads the source's backbone (parameters and batch-norm
    buffers) into target.backbone and leaves target.head alone."""
    from tinydeeplab import models

    source = models.deeplab_v2(2, "tiny", 8, seed=3)
    rng = np.random.default_rng(13)
    for _, m in source.backbone.named_modules():  # statistics a training run would leave
        if hasattr(m, "running_mean"):
            m.register_buffer("running_mean", rng.standard_normal(m.running_mean.shape)
                              .astype(np.float32))
            m.register_buffer("running_var", rng.uniform(0.5, 2, m.running_var.shape)
                              .astype(np.float32))
    target = models.deeplab_v2(5, "tiny", 8, seed=4)
    head_before = {k: v.copy() for k, v in target.head.state_dict().items()}
    fn(source.state_dict(), target)
    for k, v in source.backbone.state_dict().items():
        assert np.array_equal(target.backbone.state_dict()[k], v), \
            f"backbone.{k} was not moved (batch-norm statistics are part of the backbone)"
    for k, v in target.head.state_dict().items():
        assert np.array_equal(v, head_before[k]), f"head.{k} changed: keep the new head"
    return True


# ---- 14 ------------------------------------------------------------------------------------
def check_dy_col(fn):
    """fn(dy, r, m, kh, kw, s, pad, d, H, W): entry (r, m) of the implicit matrix dY_col; the
    check builds dX = Σ_r W[:, :, r] dY_col[r] with it and compares with conv2d_backward."""
    from tinydeeplab.kernels import atrous_conv

    rng = np.random.default_rng(14)
    for (N, C, H, W, K, kh, kw, s, pad, d) in [(1, 2, 7, 9, 3, 3, 3, 1, 2, 2),
                                               (2, 3, 9, 8, 2, 3, 3, 2, 1, 1),
                                               (1, 2, 11, 10, 2, 3, 2, 2, 3, 3)]:
        x = rng.standard_normal((N, C, H, W))
        w = rng.standard_normal((K, C, kh, kw))
        y = atrous_conv.conv2d_forward(x, w, None, s, pad, d, variant="cpu_v1")
        dy = rng.standard_normal(y.shape)
        dx_ref, _, _ = atrous_conv.conv2d_backward(x, w, dy, s, pad, d, variant="cpu_v1")
        R, M = K * kh * kw, N * H * W
        cols = np.array([[fn(dy, r, m, kh, kw, s, pad, d, H, W) for m in range(M)]
                         for r in range(R)], np.float64)
        w_rows = w.transpose(1, 0, 2, 3).reshape(C, R)  # W[c, (k, p, q)]
        dx = (w_rows @ cols).reshape(C, N, H, W).transpose(1, 0, 2, 3)
        _close(dx, dx_ref, f"dX built from your dY_col (stride {s}, pad {pad}, rate {d}, "
                           f"{kh}×{kw} kernel)", atol=1e-10)
    return True


# ---- 15 ------------------------------------------------------------------------------------
def check_number_by_sorting(fn):
    """fn(keys (K, d) ints) -> (vertex (K,), M): vertices numbered in lexicographic order of
    their keys, against NumPy's unique rows."""
    rng = np.random.default_rng(15)
    for K, d, spread in [(1, 2, 3), (40, 2, 3), (300, 5, 4), (257, 3, 100)]:
        keys = rng.integers(-spread, spread, (K, d)).astype(np.int32)
        unique, inverse = np.unique(keys, axis=0, return_inverse=True)
        vertex, M = fn(keys)
        assert int(M) == len(unique), f"{K} keys of {d} coordinates: you count {M} vertices, " \
                                      f"there are {len(unique)}"
        vertex = np.asarray(vertex)
        assert vertex.shape == (K,), f"vertex has shape {vertex.shape}, expected ({K},)"
        assert (vertex == inverse.ravel()).all(), (
            f"{K} keys of {d} coordinates: {int((vertex != inverse.ravel()).sum())} keys get "
            "another vertex number than their key's place in lexicographic order")
    return True


# ---- 16 ------------------------------------------------------------------------------------
def check_paired_verdict(fn):
    """fn(differences) -> "first" | "second" | "neither", by the mean against the spread."""
    cases = [([0.02, 0.03, 0.025], "first"), ([-0.02, -0.01], "second"),
             ([0.05, -0.04, 0.01], "neither"), ([0.04], "neither"), ([0.01, 0.01], "first"),
             ([-0.01, 0.05], "neither"), ([-0.03, -0.029, 0.0], "second")]
    for gaps, expected in cases:
        got = fn(np.asarray(gaps))
        assert got == expected, (f"differences {gaps}: you say {got!r}, the rule says "
                                 f"{expected!r} (mean {np.mean(gaps):+.4f}, spread "
                                 f"{np.std(gaps):.4f})")
    return True
