"""The fully connected CRF of Krähenbühl & Koltun (NIPS 2011), DeepLab v2's last stage.

Energy over labellings x of N pixels:  E(x) = Σ_i ψ_u(x_i) + Σ_{i<j} μ(x_i, x_j) Σ_m w_m k_m(f_i, f_j)
with Gaussian kernels k_m on features f (positions; positions and colours).  Mean-field
inference (their §3, eq. 4-5) iterates

    Q_i(l) ∝ exp(−ψ_u(x_i = l) − Σ_m Σ_l' μ_m(l, l') Σ_j k_m(f_i, f_j) Q_j(l'))

and the sum over all pixels j is one Gaussian filter per kernel, computed on the permutohedral
lattice (``kernels.permutohedral``) in linear time.  As in densecrf/pydensecrf, the filter
includes the pixel itself (the paper's sum is over j ≠ i), kernels are normalised
symmetrically (k̃ = D^−½ K D^−½ with D = K·1), and a Potts compatibility of weight w
contributes  +w · k̃ Q  to the log-potential.  ``DenseCRF.inference`` is that loop, plainly;
the fast schedules of the same loop (``kernels.permutohedral.ENGINES``) are tested against it.

``DenseCRF2D`` copies pydensecrf's interface and semantics, so switching is one import line;
``dense_crf`` is DeepLab v2's post-processing with its ResNet-101 VOC parameters.
"""
import math
import warnings

import numpy as np

from .autograd import Function, Tensor, is_grad_enabled
from .backend import array_module, cuda_simulator, has_cuda, on_gpu, to_device
from .kernels import permutohedral as _lattice
from .kernels.softmax import softmax_rows
from .nn import Module, Parameter

# pydensecrf's enums, same values
CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL = 0, 1, 2
NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC = 0, 1, 2, 3


def resolve_device(device, *arrays):
    """"cpu" or "cuda": as asked, else where the arrays are.  "cuda" needs CuPy and a GPU, or
    Numba's CUDA simulator (then the CUDA kernels run on NumPy arrays, for testing)."""
    if device is None:
        return "cuda" if any(on_gpu(a) for a in arrays) else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not (has_cuda() or cuda_simulator()):
        raise RuntimeError("device='cuda' needs CuPy and a CUDA GPU (pip install "
                           "tinydeeplab[cuda]), or NUMBA_ENABLE_CUDASIM=1 for the simulator")
    return device


def on_device(a, device):
    """``a`` as the kernels for ``device`` take it (NumPy under the CUDA simulator)."""
    if device == "cuda" and has_cuda():
        return to_device(a, "cuda")
    if device == "cpu":
        return to_device(a, "cpu")
    return a


class PermutohedralLattice:
    """Gaussian filtering with unit standard deviation on pre-scaled features.

    ``PermutohedralLattice(features)``: features (N, d) — divide each feature by its kernel
    width first.  ``filter(values)``: values (N, c) → Σ_j exp(−|f_i − f_j|²/2) v_j,
    approximately (see tests/test_lattice.py for the error against the exact sum), the point
    itself included.  NumPy arrays run on the CPU, CuPy arrays on the GPU (or pass device=).
    ``variant``: a name from ``kernels.permutohedral.VARIANTS`` ("reference", "cpu",
    "cpu_fast", "cuda"); None: the default for the device.  ``kernel`` is the built lattice
    of that variant (its ``filter`` also takes per-point factors ``pre`` and ``post``).
    """

    def __init__(self, features, device=None, variant=None):
        self.device = resolve_device(device, features)
        features = on_device(features, self.device)
        xp = array_module(features)
        features = xp.asarray(features)
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(f"features must be a non-empty (N, d) array, got shape "
                             f"{features.shape}")
        top = float(abs(features).max())  # NaN and ±inf carry through max: one pass checks all
        if not math.isfinite(top):
            raise ValueError("features hold NaN or infinite values")
        limit = 2**30 / (features.shape[1] + 1) ** 2
        if top > limit:
            raise ValueError(f"features up to {top:.3g} are too large "
                             f"for the lattice's int32 keys (limit {limit:.3g} for d = "
                             f"{features.shape[1]}); are they divided by the kernel widths?")
        self.variant = _lattice.variant_name(variant, self.device)
        self.kernel = _lattice.build(features, self.variant)
        self.N, self.d = features.shape

    @property
    def num_vertices(self):
        return self.kernel.M

    def filter(self, values, reverse=False):
        """Filter values (N, c) (or (N,)); ``reverse=True`` applies the transposed operator.

        float32 in, float32 out; float64 values are filtered in float64."""
        values = on_device(values, self.device)
        xp = array_module(values)
        double = getattr(values, "dtype", None) == xp.float64
        values = xp.asarray(values, dtype=xp.float64 if double else xp.float32)
        vector = values.ndim == 1
        if vector:
            values = values[:, None]
        if values.ndim != 2 or values.shape[0] != self.N:
            raise ValueError(f"values must be ({self.N}, c), got shape {values.shape}")
        out = self.kernel.filter(values, reverse)
        return out[:, 0] if vector else out


class _Pairwise:
    """One Gaussian kernel with its normalisation and label compatibility."""

    def __init__(self, features, compat, normalization, num_labels, device, variant):
        if normalization not in (NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER,
                                 NORMALIZE_SYMMETRIC):
            raise ValueError(f"normalization must be one of NO_NORMALIZATION ... "
                             f"NORMALIZE_SYMMETRIC (0-3), got {normalization!r}")
        self.lattice = PermutohedralLattice(features, device, variant)
        xp = array_module(features)
        norm = self.lattice.filter(xp.ones(features.shape[0], dtype=xp.float32))
        if normalization == NO_NORMALIZATION:
            norm = xp.ones_like(norm)
        elif normalization == NORMALIZE_SYMMETRIC:
            norm = (1.0 / xp.sqrt(norm + 1e-20)).astype(xp.float32)
        else:
            norm = (1.0 / (norm + 1e-20)).astype(xp.float32)
        ones = xp.ones(features.shape[0], dtype=xp.float32)
        self.pre = norm if normalization in (NORMALIZE_SYMMETRIC, NORMALIZE_BEFORE) else ones
        self.post = norm if normalization in (NORMALIZE_SYMMETRIC, NORMALIZE_AFTER) else ones
        self.compat = _compatibility(compat, num_labels, xp)
        if self.compat[0] == "potts":  # for the engines: the weight rides along with post
            self.post_w = self.post * self.compat[1]  # float32 (the weight is a Python float)

    def message(self, Q):
        """Σ_j k̃(f_i, f_j) Q_j for every pixel i: the normalised Gaussian filter of Q (N, C)."""
        return self.lattice.kernel.filter(Q, pre=self.pre, post=self.post)

    def compatibility(self, message):
        """Σ_l' μ(l, l') message(l'), signs as densecrf (checked against pydensecrf): a Potts
        weight w rewards agreeing with the neighbours, μ(l, l') = −w·[l = l']; a diagonal or
        full compatibility μ is an energy as given (a matrix symmetrised)."""
        kind, w = self.compat
        if kind == "potts":
            return message * -w
        if kind == "diag":
            return message * w[None, :]
        return message @ w  # w symmetric: (μ messageᵀ)ᵀ


def _compatibility(compat, C, xp):
    if np.isscalar(compat):
        if not np.isfinite(compat):
            raise ValueError(f"compat must be a finite number, got {compat!r}")
        return "potts", float(compat)
    m = np.asarray(to_device(compat, "cpu") if not isinstance(compat, list) else compat,
                   dtype=np.float32)
    if not np.isfinite(m).all():
        raise ValueError("compat holds NaN or infinite values")
    if m.shape == (C,):
        return "diag", xp.asarray(m)
    if m.shape == (C, C):
        return "matrix", xp.asarray(0.5 * (m + m.T))  # densecrf symmetrises
    raise ValueError(f"compat must be a number, a ({C},) vector or a ({C}, {C}) matrix, got "
                     f"shape {m.shape}")


class DenseCRF:
    """pydensecrf.densecrf.DenseCRF: N variables, C labels, any pairwise features."""

    def __init__(self, N, C, device=None, variant=None):
        if int(N) < 1 or int(C) < 1:
            raise ValueError(f"DenseCRF needs N ≥ 1 pixels and C ≥ 1 labels, got N={N}, C={C}")
        self.N, self.C = int(N), int(C)
        self.device = None if device is None else resolve_device(device)
        self.variant = variant  # of the lattices (None: the default for the device)
        self.unary = None
        self.pairwise = []
        self._engines = {}  # (engine, the kernels it was made for) -> the engine, or None

    def _place(self, a):
        """Fix the device on first use (from the first array seen) and move ``a`` there."""
        if self.device is None:
            self.device = resolve_device(None, a)
        return on_device(a, self.device)

    def setUnaryEnergy(self, U):  # noqa: N802  (pydensecrf's name)
        """U: (C, N) float32 energies, −log of the label probabilities."""
        U = self._place(U)
        xp = array_module(U)
        U = xp.asarray(U)
        if U.shape != (self.C, self.N):
            raise ValueError(f"unary must have shape (C, N) = ({self.C}, {self.N}), got "
                             f"{U.shape}")
        if U.dtype != xp.float32:
            raise ValueError(f"unary must be float32 (as pydensecrf), got {U.dtype}")
        if not bool(xp.isfinite(U).all()):
            raise ValueError("unary holds NaN or infinite energies")
        self.unary = U

    def addPairwiseEnergy(self, features, compat, kernel=DIAG_KERNEL,  # noqa: N802
                          normalization=NORMALIZE_SYMMETRIC):
        """features: (d, N) float32, already divided by the kernel widths."""
        features = self._place(features)
        xp = array_module(features)
        features = xp.asarray(features, dtype=xp.float32)
        if features.ndim != 2 or features.shape[1] != self.N:
            raise ValueError(f"features must have shape (d, N) with N = {self.N}, got "
                             f"{features.shape}")
        self._add_kernel(xp.ascontiguousarray(features.T), compat, kernel, normalization)

    def _add_kernel(self, features, compat, kernel, normalization):
        """addPairwiseEnergy with the features as the lattice takes them: (N, d) float32,
        C-contiguous (the 2-D kernels make them so, with no transposed copy)."""
        if kernel != DIAG_KERNEL:
            raise ValueError("only kernel=DIAG_KERNEL (pydensecrf's default) is implemented")
        features = self._place(features)
        self.pairwise.append(_Pairwise(features, compat, normalization, self.C, self.device,
                                       self.variant))

    def inference(self, n_iterations, engine=None):
        """Q (C, N) float32 after n mean-field iterations (0: the softmax of −U).

        Krähenbühl & Koltun (2011), Algorithm 1, as densecrf computes it (the filter
        includes the pixel itself).  ``engine``: "plain" runs the loop below; a name from
        ``kernels.permutohedral.ENGINES`` runs that fast schedule of the same loop; None
        (default) takes the lattices' engine where every kernel is Potts, else the loop."""
        if int(n_iterations) != n_iterations or n_iterations < 0:
            raise ValueError(f"n_iterations must be a non-negative integer, got {n_iterations}")
        if self.unary is None:
            raise ValueError("call setUnaryEnergy before inference")
        fast = self.mean_field_engine(engine)
        if fast is not None:
            return fast.run(self.unary, int(n_iterations))
        xp, cuda = array_module(self.unary), self.device == "cuda"
        neg_unary = xp.ascontiguousarray(-self.unary.T)  # (N, C): pixels in rows
        Q = softmax_rows(neg_unary, xp.empty_like(neg_unary), cuda)  # Q ∝ exp(−U)
        for _ in range(int(n_iterations)):
            A = neg_unary.copy()
            for kernel in self.pairwise:
                message = kernel.message(Q)  # message passing: Σ_j k̃(f_i, f_j) Q_j
                A -= kernel.compatibility(message)  # compatibility transform, local update
            Q = softmax_rows(A, A, cuda)  # normalise
        return xp.ascontiguousarray(Q.T)

    def mean_field_engine(self, engine=None):
        """The fast mean-field schedule ``inference(n, engine)`` runs (made once per set of
        kernels and kept), or None where it runs the plain loop."""
        if engine == "plain" or not self.pairwise:
            return None
        variant = self.pairwise[0].lattice.variant
        potts = all(p.compat[0] == "potts" for p in self.pairwise)
        if engine is None:
            engine = _lattice.engine_for(variant) if potts else None
            if engine is None:
                return None
        elif engine not in _lattice.ENGINES:
            raise ValueError(f"engine must be 'plain' or one of {sorted(_lattice.ENGINES)}, "
                             f"got {engine!r}")
        elif _lattice.ENGINES[engine].variant != variant or not potts:
            raise ValueError(f"engine {engine!r} runs Potts kernels on "
                             f"{_lattice.ENGINES[engine].variant!r} lattices; these are "
                             f"{variant!r}{'' if potts else ' and not all Potts'}")
        key = (engine, tuple(id(p) for p in self.pairwise))
        if key not in self._engines:
            self._engines = {key: _lattice.make_engine(
                engine, [p.lattice.kernel for p in self.pairwise],
                [p.pre for p in self.pairwise], [p.post_w for p in self.pairwise], self.C)}
        return self._engines[key]


def _pair(value, name):
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive number or (x, y) pair, got {value!r}")
    return pair


class DenseCRF2D(DenseCRF):
    """pydensecrf.densecrf.DenseCRF2D: an image of W×H pixels (row-major) and C labels."""

    def __init__(self, W, H, C, device=None, variant=None):
        if int(W) != W or int(H) != H or int(W) < 1 or int(H) < 1:
            raise ValueError(f"image size must be whole numbers of at least 1×1, got W={W}, "
                             f"H={H}")
        super().__init__(int(W) * int(H), C, device, variant)
        self.W, self.H = int(W), int(H)

    def _xp(self):
        """Where to compute the pixel features: on the GPU when the CRF runs there."""
        if self.device == "cuda" and has_cuda():
            import cupy

            return cupy
        return np

    def addPairwiseGaussian(self, sxy, compat, kernel=DIAG_KERNEL,  # noqa: N802
                            normalization=NORMALIZE_SYMMETRIC):
        """Smoothness kernel on positions: exp(−|p_i − p_j|² / 2 sxy²)."""
        sx, sy = _pair(sxy, "sxy")
        xp = self._xp()
        positions = _pixel_features(self.H, self.W, (sx, sy), xp=xp)
        self._add_kernel(xp.stack(positions, axis=1), compat, kernel, normalization)

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat, kernel=DIAG_KERNEL,  # noqa: N802
                             normalization=NORMALIZE_SYMMETRIC):
        """Appearance kernel: exp(−|p_i − p_j|² / 2 sxy² − |I_i − I_j|² / 2 srgb²)."""
        sx, sy = _pair(sxy, "sxy")
        srgb = (srgb,) * 3 if np.isscalar(srgb) else tuple(srgb)
        if len(srgb) != 3 or min(srgb) <= 0:
            raise ValueError(f"srgb must be a positive number or an (r, g, b) triple, got "
                             f"{srgb!r}")
        xp = self._xp()  # (the uint8 image is a quarter of the features' size to move)
        image = to_device(_check_image(rgbim, self.H, self.W), "cuda" if xp is not np else "cpu")
        features = _pixel_features(self.H, self.W, (sx, sy), image, srgb, xp=xp)
        self._add_kernel(xp.stack(features, axis=1), compat, kernel, normalization)


def _pixel_features(H, W, sxy, image=None, srgb=None, xp=np):
    """Feature columns of an H×W image, float32 as densecrf: x / sx, y / sy and, with an image,
    r / s_r, g / s_g, b / s_b (NumPy or CuPy arrays, as ``xp``; the same numbers)."""
    y, x = xp.mgrid[0:H, 0:W].astype(xp.float32)
    columns = [x.ravel() / np.float32(sxy[0]), y.ravel() / np.float32(sxy[1])]
    if image is not None:
        colours = xp.asarray(image, dtype=xp.float32).reshape(-1, 3)
        columns += [colours[:, c] / np.float32(srgb[c]) for c in range(3)]
    return columns


def _check_image(image, H, W):
    xp = array_module(image)
    image = xp.asarray(image)
    if image.dtype != xp.uint8:
        raise ValueError(f"image must be uint8 RGB (H, W, 3), got dtype {image.dtype}")
    if image.shape != (H, W, 3):
        raise ValueError(f"image must have shape (H, W, 3) = ({H}, {W}, 3), got {image.shape}")
    return image


def unary_from_softmax(sm, scale=None, clip=1e-5):
    """−log of class probabilities sm (C, ...) as a (C, N) float32 unary (pydensecrf.utils)."""
    xp = array_module(sm)
    sm = xp.asarray(sm)
    if sm.dtype.kind != "f":
        raise ValueError(f"sm must hold floating-point probabilities, got dtype {sm.dtype}")
    C = sm.shape[0]
    if scale is not None:
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        # mix with the uniform distribution, in float64 as pydensecrf (its uniform is float64)
        sm = scale * sm + (1 - scale) * xp.full(sm.shape, 1.0 / C)
    # −log(clip(sm)) computed in sm's dtype (as pydensecrf) in one new array, then float32
    U = xp.empty(sm.shape, dtype=sm.dtype)

    def minus_log(part):  # of the flat range part, in place
        u = U.reshape(-1)[part]
        if clip is not None:
            xp.clip(sm.reshape(-1)[part], clip, 1.0, out=u)
        else:
            u[...] = sm.reshape(-1)[part]
        xp.log(u, out=u)
        xp.negative(u, out=u)

    if xp is np and U.size >= 1 << 20:
        # NumPy's float32 log takes ~3 ns a value here, one core: the image's share of the
        # CRF's time is worth both cores (NumPy lets go of the GIL inside a ufunc; the values
        # are the same however the array is split)
        sm = np.ascontiguousarray(sm)
        pool, T = _thread_pool()
        bounds = [U.size * t // T for t in range(T + 1)]
        list(pool.map(minus_log, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]))
    else:
        minus_log(slice(None))
    return U.reshape(C, -1).astype(xp.float32, copy=False)


_pool = []


def _thread_pool():
    """(pool, workers): a thread pool with one worker per Numba thread, made on first use."""
    if not _pool:
        import concurrent.futures

        import numba

        T = numba.get_num_threads()
        _pool.append((concurrent.futures.ThreadPoolExecutor(T), T))
    return _pool[0]


def unary_from_labels(labels, n_labels, gt_prob, zero_unsure=True):
    """Unary from a label map (pydensecrf.utils semantics): each pixel believes its label with
    probability gt_prob, the rest spread evenly.  With ``zero_unsure`` label 0 means "unknown"
    (uniform) and labels 1..n_labels map to classes 0..n_labels−1."""
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    labels = np.asarray(labels).ravel()
    cls = labels - 1 if zero_unsure else labels
    known = labels != 0 if zero_unsure else np.ones(labels.shape, dtype=bool)
    if (cls[known] < 0).any() or (cls[known] >= n_labels).any():
        raise ValueError(f"labels must lie in {'1' if zero_unsure else '0'}..."
                         f"{n_labels if zero_unsure else n_labels - 1}")
    U = np.full((n_labels, labels.size), -np.log((1 - gt_prob) / (n_labels - 1)),
                dtype=np.float32)
    idx = np.nonzero(known)[0]
    U[cls[idx], idx] = -np.log(gt_prob)
    U[:, ~known] = -np.log(1.0 / n_labels)
    return U


def dense_crf(image, probs, iterations=10, pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=67,
              bi_rgb_std=3, device=None):
    """DeepLab v2's CRF post-processing: image (H, W, 3) uint8, probs (C, H, W) → Q (C, H, W).

    Defaults are DeepLab v2's for ResNet-101 on VOC.  CuPy inputs run on the GPU.
    """
    xp = array_module(probs)
    probs = xp.asarray(probs)
    if probs.ndim != 3 or min(probs.shape) == 0:
        raise ValueError(f"probs must be (C, H, W) with every size ≥ 1, got {probs.shape}")
    C, H, W = probs.shape
    image = _check_image(image, H, W)
    if probs.dtype.kind != "f":
        raise ValueError(f"probs must hold floating-point class probabilities, got dtype "
                         f"{probs.dtype}")
    if not bool(xp.isfinite(probs).all()) or bool((probs < 0).any()):
        raise ValueError("probs must be finite and non-negative (class probabilities)")
    sums = probs.sum(axis=0, dtype=xp.float64)
    low, high = float(sums.min()), float(sums.max())
    if low < 1 - 1e-3 or high > 1 + 1e-3:  # another scale gives another labelling, silently
        raise ValueError(f"probs must sum to 1 over the classes at every pixel, found sums "
                         f"from {low:.3g} to {high:.3g}: divide by probs.sum(0), or pass the "
                         f"softmax of the logits")
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations}")
    crf = DenseCRF2D(W, H, C, device=resolve_device(device, probs))
    crf.setUnaryEnergy(xp.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
    crf.addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=image, compat=bi_w)
    return crf.inference(iterations).reshape(C, H, W)


DENSE_CRF_PARAMS = ("iterations", "pos_w", "pos_xy_std", "bi_w", "bi_xy_std", "bi_rgb_std")


def read_params(path):
    """``dense_crf`` keyword arguments from a JSON file (``tune-crf`` writes one: the
    parameters under "crf", beside the search's table); every value checked."""
    import json
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"CRF parameter file {path!r} does not exist")
    try:
        with open(path) as f:
            obj = json.load(f)
    except ValueError as e:
        raise ValueError(f"CRF parameter file {path!r} is not valid JSON: {e}") from None
    params = obj.get("crf", obj) if isinstance(obj, dict) else None
    if not isinstance(params, dict):
        raise ValueError(f"{path!r} must hold an object of dense CRF parameters")
    unknown = sorted(set(params) - set(DENSE_CRF_PARAMS))
    if unknown:
        raise ValueError(f"{path!r}: unknown CRF parameters {unknown}; known: "
                         f"{list(DENSE_CRF_PARAMS)}")
    for k, v in params.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0 or (k != "pos_w" and k != "bi_w" and v == 0):
            raise ValueError(f"{path!r}: {k} must be a positive number, got {v!r}")
    if "iterations" in params and int(params["iterations"]) != params["iterations"]:
        raise ValueError(f"{path!r}: iterations must be an integer, got "
                         f"{params['iterations']!r}")
    return dict(params)


# ---- the CRF as a trainable layer (end to end) ---------------------------------------------------
# DeepLab v2 runs the CRF after the network, so the network never learns with it.  Unrolling
# T mean-field iterations as layers (in the spirit of "CRF as RNN", Zheng et al. 2015) makes
# it differentiable:
#
#     Q_0 = softmax(U)                                   U: the network's logits (N, C)
#     A_t = U + Σ_k  F_k(Q_{t−1}) W_k        t = 1..T    F_k(x) = D_k^−½ K_k D_k^−½ x
#     Q_t = softmax(A_t)                                 the output is A_T (logits again)
#
# K_k is the lattice filter of kernel k (spatial, bilateral) and D_k = diag(K_k 1) its
# symmetric normalisation.  W_k is the label compatibility as a reward matrix: w·I is
# densecrf's Potts model with weight w (the layer's forward equals ``dense_crf``), a full C×C
# matrix lets the layer learn which labels go together.
#
# Backward, given g = ∂L/∂A_T, for t = T..1:
#     ∂L/∂U   += g
#     G_k      = F_kᵀ(g) = D_k^−½ K_kᵀ D_k^−½ g      K_kᵀ is the reversed filter (blur order
#                                                    reversed; splat and slice swap roles)
#     ∂L/∂W_k += Q_{t−1}ᵀ G_k       (for Potts: Σ Q_{t−1} ⊙ G_k, the trace of that)
#     ∂L/∂Q    = Σ_k G_k W_kᵀ
#     g        = Q_{t−1} ⊙ (∂L/∂Q − Σ_c ∂L/∂Q ⊙ Q_{t−1})    (softmax backward: ∂L/∂A_{t−1})
# and finally ∂L/∂U += g (through Q_0).  ⟨g, F(Q) W⟩ = ⟨Fᵀ(g), Q W⟩ is why no message has to
# be stored: the backward keeps only Q_0..Q_{T−1} and filters once per kernel per iteration,
# like the forward.  D_k depends on the image and the kernel widths alone, not on U or W, so
# it is a constant diagonal scaling here and F_k stays linear; the widths are fixed (moving
# them would move the lattice itself, which has no useful derivative).
class _Kernel:
    """One normalised Gaussian kernel F(x) = n ⊙ K(n ⊙ x) on a built lattice."""

    def __init__(self, features, device):
        self.lattice = PermutohedralLattice(features, device)
        self.xp = getattr(self.lattice.kernel, "xp", np)  # the CUDA lattice's array module
        self._norms = {}

    def norm(self, dtype):
        """n = 1/√(K·1), computed in ``dtype`` (float32: as densecrf), once per dtype."""
        key = np.dtype(dtype).name
        if key not in self._norms:
            ones = self.xp.ones(self.lattice.N, dtype=dtype)
            self._norms[key] = (1.0 / self.xp.sqrt(self.lattice.filter(ones) + 1e-20)
                                ).astype(dtype)
        return self._norms[key]

    def apply(self, x, reverse=False, scale=None, out=None):
        """(scale ·) F(x) (or Fᵀ with reverse), added to ``out`` when given."""
        n = self.norm(x.dtype)
        post = n if scale is None else n * x.dtype.type(scale)
        return self.lattice.kernel.filter(x, reverse, n, post, out)


class _MeanField(Function):
    """Mean field over a batch; one (kernels) list per image, one weight per kernel."""

    @staticmethod
    def forward(ctx, logits, *weights, kernels, iterations, cuda):
        xp = array_module(logits)
        B, C, H, W = logits.shape
        out = xp.empty_like(logits)
        mats = [_as_matrix(w, C) for w in weights]
        keep = is_grad_enabled() and any(ctx.needs_input_grad)  # else no backward will come
        ctx.saved = []
        for b in range(B):
            U = xp.ascontiguousarray(logits[b].reshape(C, H * W).T)  # (N, C)
            Q = softmax_rows(U, xp.empty_like(U), cuda)
            history = [Q]
            for t in range(iterations):
                A = U.copy()
                for kernel, w, m in zip(kernels[b], weights, mats):
                    if m is None:  # Potts: the weight rides along with the output scaling
                        kernel.apply(Q, scale=float(w), out=A)
                    else:
                        A += kernel.apply(Q) @ m
                if t + 1 < iterations:
                    Q = softmax_rows(A, xp.empty_like(A), cuda)
                    if keep:
                        history.append(Q)
            out[b] = A.T.reshape(C, H, W)
            if keep:
                ctx.saved.append(history)
        ctx.kernels, ctx.weights, ctx.mats, ctx.cuda = kernels, weights, mats, cuda
        return out

    @staticmethod
    def backward(ctx, grad):
        xp = array_module(grad)
        B, C, H, W = grad.shape
        dU = xp.empty_like(grad)
        dW = [xp.zeros_like(w) for w in ctx.weights]
        for b in range(B):
            g = xp.ascontiguousarray(grad[b].reshape(C, H * W).T)
            acc = xp.zeros_like(g)
            for Q in reversed(ctx.saved[b]):
                acc += g
                dQ = xp.zeros_like(g)
                for k, (kernel, w, m) in enumerate(zip(ctx.kernels[b], ctx.weights, ctx.mats)):
                    G = kernel.apply(g, reverse=True)
                    if m is None:
                        dW[k] += (Q * G).sum()
                        dQ += w * G
                    else:
                        dW[k] += Q.T @ G
                        dQ += G @ m.T
                g = Q * (dQ - (dQ * Q).sum(axis=1, keepdims=True))
            acc += g
            dU[b] = acc.T.reshape(C, H, W)
        return (dU, *dW)


def _as_matrix(w, C):
    """None for a scalar (Potts) weight, else the (C, C) compatibility matrix."""
    if w.ndim == 0:
        return None
    if w.shape != (C, C):
        raise ValueError(f"a compatibility matrix must be ({C}, {C}) for {C} labels, got "
                         f"{w.shape}")
    return w


class CRFLayer(Module):
    """Mean-field inference of the dense CRF as a layer: logits (B, C, H, W) and the images
    (B, H, W, 3) RGB in 0..255 → refined logits (B, C, H, W), differentiable in the logits and
    in the label compatibilities.

    Kernels as DeepLab v2's CRF (``dense_crf``'s defaults: spatial width ``pos_xy_std``,
    bilateral widths ``bi_xy_std`` / ``bi_rgb_std``), symmetric normalisation.  ``compat``:
    ``"potts"`` learns the two weights ``pos_w`` and ``bi_w`` (initialised to the given
    values); ``"matrix"`` learns a full C×C compatibility per kernel (initialised to
    ``weight · I``, which is Potts; give ``num_classes``).  Widths are fixed.  ``learn_scale``
    multiplies the output logits by a learned scalar (1 at first): the loss can then calibrate
    the confidence without shrinking the pairwise weights; the labelling does not change.
    ``test_iterations``: mean-field iterations in eval mode (default: ``iterations``) — as
    Zheng et al. (2015), train unrolled for 5 and run 10 at test time.  Softmax of the
    output equals ``dense_crf(image, softmax(logits), iterations, ...)`` for Potts weights.
    """

    def __init__(self, iterations=5, pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0,
                 bi_rgb_std=3.0, compat="potts", num_classes=None, learn_scale=False,
                 test_iterations=None, device=None):
        super().__init__()
        test_iterations = iterations if test_iterations is None else test_iterations
        for name, v in (("iterations", iterations), ("test_iterations", test_iterations)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        for name, v in (("pos_xy_std", pos_xy_std), ("bi_xy_std", bi_xy_std),
                        ("bi_rgb_std", bi_rgb_std)):
            if not v > 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if compat == "potts":
            self.pos_w = Parameter(np.array(pos_w, dtype=np.float32))
            self.bi_w = Parameter(np.array(bi_w, dtype=np.float32))
        elif compat == "matrix":
            if num_classes is None or int(num_classes) < 1:
                raise ValueError("compat='matrix' needs num_classes (the number of labels)")
            eye = np.eye(int(num_classes), dtype=np.float32)
            self.pos_w = Parameter(pos_w * eye)
            self.bi_w = Parameter(bi_w * eye)
        else:
            raise ValueError(f"compat must be 'potts' or 'matrix', got {compat!r}")
        self.iterations, self.test_iterations = int(iterations), int(test_iterations)
        self.compat = compat
        self.pos_xy_std, self.bi_xy_std, self.bi_rgb_std = pos_xy_std, bi_xy_std, bi_rgb_std
        self.learn_scale = bool(learn_scale)
        if self.learn_scale:  # a temperature on the output: calibration without weakening
            self.scale = Parameter(np.array(1.0, dtype=np.float32))  # the CRF (argmax as is)
        self.device = device
        self._spatial = {}  # the spatial lattice depends only on the image size: built once

    def kernels(self, image, device):
        """[spatial, bilateral] normalised kernels for one (H, W, 3) image."""
        H, W = image.shape[:2]
        key = (H, W, device)
        if key not in self._spatial:
            positions = _pixel_features(H, W, (self.pos_xy_std,) * 2)
            self._spatial = {key: _Kernel(np.stack(positions, axis=1), device)}
        bilateral = _pixel_features(H, W, (self.bi_xy_std,) * 2, image, (self.bi_rgb_std,) * 3)
        bilateral = _Kernel(np.stack(bilateral, axis=1), device)
        return [self._spatial[key], bilateral]

    def forward(self, logits, images):
        if not isinstance(logits, Tensor):
            raise TypeError(f"logits must be a Tensor, got {type(logits).__name__}")
        if logits.ndim != 4:
            raise ValueError(f"logits must be (B, C, H, W), got shape {logits.shape}")
        B, C, H, W = logits.shape
        images = to_device(images.data if isinstance(images, Tensor) else images, "cpu")
        if images.shape != (B, H, W, 3):
            raise ValueError(f"images must be (B, H, W, 3) = ({B}, {H}, {W}, 3) to match the "
                             f"logits, got shape {images.shape}")
        if images.dtype != np.uint8 and not (np.isfinite(images).all() and images.min() >= 0
                                             and images.max() <= 255):
            raise ValueError("images must be RGB values in 0..255")
        if images.dtype.kind == "f" and images.size and images.max() <= 1.0:
            warnings.warn("CRFLayer: the images' values all lie in 0..1, but the kernels' "
                          "colour widths are for 0..255 (multiply by 255)", UserWarning,
                          stacklevel=2)
        if self.compat == "matrix" and self.pos_w.shape[0] != C:
            raise ValueError(f"the layer's compatibility matrices are for "
                             f"{self.pos_w.shape[0]} labels, the logits have {C}")
        device = resolve_device(self.device, logits.data)
        kernels = [self.kernels(images[b], device) for b in range(B)]
        iterations = self.iterations if self.training else self.test_iterations
        out = _MeanField.apply(logits, self.pos_w, self.bi_w, kernels=kernels,
                               iterations=iterations, cuda=device == "cuda")
        return out * self.scale if self.learn_scale else out

    def extra_repr(self):
        return (f"iterations={self.iterations}, test_iterations={self.test_iterations}, "
                f"compat={self.compat!r}, "
                f"pos_xy_std={self.pos_xy_std}, bi_xy_std={self.bi_xy_std}, "
                f"bi_rgb_std={self.bi_rgb_std}")
