"""Mean-field inference: every engine against the plain loop of DenseCRF.inference; bad input."""
import numpy as np
import pytest

from crf_helpers import synthetic_scene

from tinydeeplab import crf


def scene_crf(H, W, C, seed, variant=None, compat="potts", bilateral=True, sxy=3):
    """A DenseCRF2D on a synthetic scene: a Gaussian kernel and (optionally) a bilateral one,
    with Potts, diagonal or full compatibilities."""
    image, probs = synthetic_scene(H, W, C, seed)
    rng = np.random.default_rng(seed)
    weights = {"potts": (3.0, 4.0),
               "diag": tuple(rng.random(C).astype(np.float32) * 3 for _ in range(2)),
               "matrix": tuple(rng.random((C, C)).astype(np.float32) * 3 for _ in range(2))}
    d = crf.DenseCRF2D(W, H, C, variant=variant)
    d.setUnaryEnergy(crf.unary_from_softmax(probs))
    d.addPairwiseGaussian(sxy=sxy, compat=weights[compat][0])
    if bilateral:
        d.addPairwiseBilateral(sxy=20, srgb=5, rgbim=image, compat=weights[compat][1])
    return d


@pytest.mark.parametrize("compat", ["potts", "diag", "matrix"])
@pytest.mark.parametrize("variant", ["cpu", "cpu_fast"])
def test_plain_loop_on_every_cpu_variant_equals_the_reference(variant, compat):
    """The plain mean-field loop gives the same Q on every lattice variant: bit for bit on the
    plain parallel one (the reference's sums in its order); within float32 rounding on the
    fast one (its slice adds three corners at a time, so its sums round differently)."""
    H, W, C, n = 23, 31, 5, 4
    expected = scene_crf(H, W, C, 3, "reference", compat).inference(n, engine="plain")
    got = scene_crf(H, W, C, 3, variant, compat).inference(n, engine="plain")
    if variant == "cpu":
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("iterations", [0, 1, 6])
@pytest.mark.parametrize("bilateral", [True, False])
@pytest.mark.parametrize("stream, together", [(None, None), (True, None), (False, True),
                                              (False, False)])
def test_cpu_engine_equals_the_plain_loop(iterations, bilateral, stream, together):
    """MeanFieldCPU, with each of its schedules forced (the first kernel's message in one
    sweep or not; two kernels splatted in one pass or apart; None: the size rules), against
    DenseCRF.inference's plain loop on the same lattices.  Not bit for bit: the engine adds
    the messages into −U in the slice and fuses the softmax, whose float32 sums round
    differently; Q stays within 3e-6."""
    from tinydeeplab.kernels.permutohedral.cpu_fast import MeanFieldCPU

    H, W, C = 37, 53, 6
    d = scene_crf(H, W, C, 11, bilateral=bilateral, sxy=1)
    expected = d.inference(iterations, engine="plain")
    engine = MeanFieldCPU([p.lattice.kernel for p in d.pairwise], [p.pre for p in d.pairwise],
                          [p.post_w for p in d.pairwise], stream=stream, together=together)
    got = engine.run(d.unary, iterations)
    np.testing.assert_allclose(got, expected, atol=3e-6, rtol=0)
    if stream is None and together is None:  # the default engine is this one
        np.testing.assert_array_equal(d.inference(iterations), got)


def test_engines_are_chosen_by_name():
    """None: the lattices' engine where every kernel is Potts, the plain loop otherwise (and
    for the variants without an engine); a name that does not fit the kernels is an error."""
    from tinydeeplab.kernels import permutohedral as P

    assert P.engine_for("cpu_fast") == "cpu_fast" and P.engine_for("reference") is None
    d = scene_crf(9, 11, 3, 1)
    d.inference(1)
    assert type(d.mean_field_engine()).__name__ == "MeanFieldCPU"
    with pytest.raises(ValueError, match="engine must be"):
        d.inference(1, engine="fastest")
    with pytest.raises(ValueError, match="'cuda' lattices"):
        d.inference(1, engine="cuda_one_launch")
    diag = scene_crf(9, 11, 3, 1, compat="diag")
    with pytest.raises(ValueError, match="not all Potts"):
        diag.inference(1, engine="cpu_fast")
    np.testing.assert_array_equal(diag.inference(2), diag.inference(2, engine="plain"))
    with pytest.raises(ValueError, match="variant must be one of"):
        crf.PermutohedralLattice(np.zeros((3, 2), np.float32), variant="fastest")
    with pytest.raises(ValueError, match="runs on the cuda"):
        crf.PermutohedralLattice(np.zeros((3, 2), np.float32), device="cpu", variant="cuda")


def test_two_megapixel_image():
    """Large images work (int32 keys, bounded memory): 1700×1200, DeepLab's parameters."""
    H, W, C = 1200, 1700, 3
    image, probs = synthetic_scene(H, W, C, seed=5)
    q = crf.dense_crf(image, probs, iterations=1)
    assert q.shape == (C, H, W) and np.allclose(q.sum(0), 1, atol=1e-4)


@pytest.mark.parametrize("image, probs, kwargs, message", [
    (np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 6), 0.5, np.float32), {}, r"\(4, 6, 3\)"),
    (np.zeros((4, 5, 3), np.float32), np.full((2, 4, 5), 0.5, np.float32), {}, "uint8"),
    (np.zeros((4, 5), np.uint8), np.full((2, 4, 5), 0.5, np.float32), {}, r"\(H, W, 3\)"),
    (np.zeros((4, 5, 4), np.uint8), np.full((2, 4, 5), 0.5, np.float32), {}, r"\(H, W, 3\)"),
    (np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 5), np.nan, np.float32), {}, "finite"),
    (np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 5), -0.5, np.float32), {}, "non-negative"),
    (np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 5), 0.5, np.float32), {"iterations": 0},
     "iterations"),
    (np.zeros((0, 5, 3), np.uint8), np.full((2, 0, 5), 0.5, np.float32), {}, "size ≥ 1"),
    (np.zeros((4, 5, 3), np.uint8), np.full((4, 5), 0.5, np.float32), {}, r"\(C, H, W\)"),
])
def test_dense_crf_rejects_bad_input(image, probs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        crf.dense_crf(image, probs, **kwargs)


def test_densecrf2d_rejects_bad_input():
    d = crf.DenseCRF2D(5, 4, 3)
    with pytest.raises(ValueError, match=r"\(C, N\) = \(3, 20\)"):
        d.setUnaryEnergy(np.zeros((3, 21), np.float32))
    with pytest.raises(ValueError, match="float32"):
        d.setUnaryEnergy(np.zeros((3, 20), np.float64))
    with pytest.raises(ValueError, match="setUnaryEnergy"):
        d.inference(2)
    with pytest.raises(ValueError, match="sxy"):
        d.addPairwiseGaussian(sxy=0, compat=3)
    with pytest.raises(ValueError, match="compat"):
        d.addPairwiseGaussian(sxy=3, compat=np.ones((2, 2)))
    with pytest.raises(ValueError, match="W=0"):
        crf.DenseCRF2D(0, 4, 3)
    with pytest.raises(ValueError, match="features"):
        crf.PermutohedralLattice(np.zeros((0, 2), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        crf.PermutohedralLattice(np.full((3, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="too large"):
        crf.PermutohedralLattice(np.full((3, 2), 1e9, np.float32))
    with pytest.raises(ValueError, match="device"):
        crf.PermutohedralLattice(np.zeros((3, 2), np.float32), device="tpu")
