"""What the CRF tests share: brute-force Gaussian filtering, scenes, pydensecrf side by side."""
import pathlib

import numpy as np
import pytest

from tinydeeplab import crf

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "crf_examples"


def brute_force_gaussian(features, values):
    f = features.astype(np.float64)
    D = ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1)
    return np.exp(-D / 2) @ values.astype(np.float64)


def relative_rms(a, b):
    return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))


# (only the tests marked needs_pydensecrf: the CUDA and bad-input tests below run without it)
try:
    import pydensecrf.densecrf as dcrf
    from pydensecrf import utils as dcrf_utils
except ImportError:
    dcrf = dcrf_utils = None
needs_pydensecrf = pytest.mark.skipif(dcrf is None, reason="pydensecrf2 (the [test] extra), "
                                      "the reference CRF, is not installed")


def run_both(W, H, C, unary, image, gaussian, bilateral, iterations, **kw):
    out = []
    for module in (dcrf, crf):
        d = module.DenseCRF2D(W, H, C)
        d.setUnaryEnergy(unary.copy())
        d.addPairwiseGaussian(**gaussian, **kw)
        d.addPairwiseBilateral(rgbim=image, **bilateral, **kw)
        out.append(np.array(d.inference(iterations)))
    return out


def assert_close(q_ref, q, tol=1e-3):
    assert q.shape == q_ref.shape and q.dtype == np.float32
    assert np.abs(q - q_ref).max() <= tol
    assert (q.argmax(0) == q_ref.argmax(0)).mean() >= 0.999


def synthetic_scene(H, W, C, seed):
    rng = np.random.default_rng(seed)
    image = (rng.random((H, W, 3)) * 60 + 40).astype(np.uint8)
    image[H // 4: 3 * H // 4, W // 5: W // 2] = (200, 40, 40)
    image[H // 3:, 2 * W // 3:] = (30, 180, 60)
    probs = rng.random((C, H, W)).astype(np.float32) ** 2
    probs /= probs.sum(0)
    return image, probs
