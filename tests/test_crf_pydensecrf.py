"""The dense CRF against pydensecrf: synthetic images, DeepLab's parameters, the real
photographs of its examples, the unary helpers."""
import numpy as np
import pytest

from crf_helpers import EXAMPLES, assert_close, dcrf, dcrf_utils, needs_pydensecrf, run_both, \
    synthetic_scene

from tinydeeplab import crf


@needs_pydensecrf
@pytest.mark.parametrize("compat", ["potts", "diagonal", "matrix"])
@pytest.mark.parametrize("normalization", ["NORMALIZE_SYMMETRIC", "NORMALIZE_BEFORE",
                                           "NORMALIZE_AFTER", "NO_NORMALIZATION"])
def test_matches_pydensecrf_on_synthetic_images(compat, normalization):
    H, W, C = 41, 57, 5
    image, probs = synthetic_scene(H, W, C, seed=len(compat) + len(normalization))
    unary = dcrf_utils.unary_from_softmax(probs)
    w = {"potts": 3.0, "diagonal": np.linspace(1, 4, C).astype(np.float32),
         "matrix": (np.arange(C * C).reshape(C, C) % 4).astype(np.float32)}[compat]
    kw = {"normalization": getattr(dcrf, normalization)}
    q_ref, q = run_both(W, H, C, unary, image, dict(sxy=3, compat=w),
                        dict(sxy=15, srgb=13, compat=w), 5, **kw)
    # Without normalisation messages are sums of ~100 kernel weights: float32 rounding grows
    assert_close(q_ref, q, tol=1e-3 if normalization != "NO_NORMALIZATION" else 3e-3)


@needs_pydensecrf
@pytest.mark.parametrize("iterations, how", [
    (0, "default"), (1, "default"), (10, "default"), (1, "stream"), (10, "stream"),
    (10, "no stream"), (3, "reference"), (3, "cpu")])
def test_deeplab_dense_crf_matches_pydensecrf(iterations, how):
    """DeepLab's CRF against pydensecrf: ``dense_crf`` as it runs by default; the CPU engine
    with the spatial kernel's message in one sweep forced on (by default only larger images
    take it) and off; the plain loop on the reference lattice and on the plain parallel one."""
    from tinydeeplab.kernels.permutohedral.cpu_fast import MeanFieldCPU

    H, W, C = 47, 63, 21
    image, probs = synthetic_scene(H, W, C, seed=iterations)
    if iterations == 0:
        with pytest.raises(ValueError, match="iterations"):
            crf.dense_crf(image, probs, iterations=0)
        return
    if how == "default":
        q = crf.dense_crf(image, probs, iterations=iterations)
    else:
        ours = crf.DenseCRF2D(W, H, C, variant=how if how in ("reference", "cpu") else None)
        ours.setUnaryEnergy(crf.unary_from_softmax(probs))
        ours.addPairwiseGaussian(sxy=1, compat=3)
        ours.addPairwiseBilateral(sxy=67, srgb=3, rgbim=image, compat=4)
        if how in ("reference", "cpu"):
            q = ours.inference(iterations)
        else:
            engine = MeanFieldCPU([k.lattice.kernel for k in ours.pairwise],
                                  [k.pre for k in ours.pairwise],
                                  [k.post_w for k in ours.pairwise], stream=how == "stream")
            q = engine.run(ours.unary, iterations)
        q = q.reshape(C, H, W)
    d = dcrf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(dcrf_utils.unary_from_softmax(probs))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=image, compat=4)
    assert_close(np.array(d.inference(iterations)).reshape(C, H, W), q)


@needs_pydensecrf
@pytest.mark.skipif(not EXAMPLES.is_dir(), reason=f"{EXAMPLES} (the shared CRF example "
                    "photographs) is not on this machine")
@pytest.mark.parametrize("n", [1, 2, 3])
def test_matches_pydensecrf_on_real_photographs(n):
    """pydensecrf's examples/inference.py settings: labels from an annotation, gt_prob 0.7,
    Gaussian sxy 3 compat 3, bilateral sxy 80 srgb 13 compat 10, 5 iterations."""
    from PIL import Image

    image = np.ascontiguousarray(np.array(Image.open(EXAMPLES / f"im{n}.png").convert("RGB")))
    anno = np.array(Image.open(EXAMPLES / f"anno{n}.png").convert("RGB")).astype(np.uint32)
    colours = anno[..., 0] << 16 | anno[..., 1] << 8 | anno[..., 2]
    values, labels = np.unique(colours, return_inverse=True)
    labels = labels.reshape(colours.shape)
    if values[0] != 0:  # black means "unknown" (label 0) in the example
        labels += 1
    n_labels = int(labels.max())
    H, W = labels.shape
    unary = dcrf_utils.unary_from_labels(labels, n_labels, gt_prob=0.7)
    np.testing.assert_array_equal(unary, crf.unary_from_labels(labels, n_labels, 0.7))
    q_ref, q = run_both(W, H, n_labels, unary, image, dict(sxy=3, compat=3),
                        dict(sxy=80, srgb=13, compat=10), 5)
    assert_close(q_ref, q)


@needs_pydensecrf
def test_unary_helpers_match_pydensecrf():
    rng = np.random.default_rng(0)
    # small arrays in one piece, large ones (≥ 2^20 values) split between threads
    for shape in ((4, 5, 6), (7, 401, 377)):
        for dtype in (np.float32, np.float64):  # the same float32 bits, whatever the dtype
            probs = rng.random(shape).astype(dtype)
            probs /= probs.sum(0)
            probs[0, 0, :2] = 1e-9  # clipped to 1e-5
            for kw in ({}, {"scale": 0.9}, {"clip": None}):
                ours = crf.unary_from_softmax(probs, **kw)
                assert ours.dtype == np.float32 and ours.shape == (shape[0], shape[1] * shape[2])
                np.testing.assert_array_equal(ours, dcrf_utils.unary_from_softmax(probs, **kw))
    labels = rng.integers(0, 5, (5, 6))
    for zero_unsure in (True, False):
        n = 4 if zero_unsure else 5
        np.testing.assert_array_equal(
            crf.unary_from_labels(labels, n, 0.6, zero_unsure),
            dcrf_utils.unary_from_labels(labels, n, 0.6, zero_unsure))
