"""Gaussian filtering in d dimensions on the permutohedral lattice (Adams, Baek & Davis 2010).

We want, for N points with features f_i ∈ ℝ^d (already divided by the kernel widths) and values
v_i ∈ ℝ^c, the Gaussian filter   out_i = Σ_j exp(−|f_i − f_j|² / 2) · v_j   (self included),
in O(N·d²) instead of O(N²).  The permutohedral lattice A*_d tiles the hyperplane
H_d = {x ∈ ℝ^(d+1) : Σ x = 0} with simplices whose vertices are integer points with all
coordinates congruent mod d+1 ("remainder-k" points).

1. **Elevate** (§3.1): f ↦ E f ∈ H_d, scaled so that the blur below has the right variance:
   elevated[j] = Σ_{i ≥ j} s_i f_i − j · s_{j−1} f_{j−1},  s_i = √(2/3)·(d+1)/√((i+1)(i+2)).
2. **Enclosing simplex** (§3.1): round every coordinate to the nearest multiple of d+1 (the
   remainder-0 point), sort the differences (their *rank*), and fix the coordinate sum back to 0.
   The d+1 vertices of the simplex are  rem0 + canonical[k][rank],  k = 0..d.
3. **Barycentric weights** of the point in that simplex, from the sorted differences.
4. **Splat** (§3.2): every vertex accumulates Σ weight · value of the points around it.
5. **Blur**: along each of the d+1 lattice directions, new = old + ½ (left + right) — the
   1-2-1 kernel, halved — with missing neighbours counting as 0.
6. **Slice**: every point reads back Σ weight · vertex value, times α = 1 / (1 + 2^−d)
   (the normalisation of the sum of the blurred simplex weights).

Transposed filter ("reverse", used for gradients): splat and slice are each other's
transposes and each blur step is symmetric, so the transpose only reverses the order of the
blur directions.  Vertices are named by their first d coordinates (the last follows from the
zero sum) and numbered in order of first appearance, so the pixels of one image row use
nearby vertices.  Steps 1-3 are float32 in the order of Krähenbühl's densecrf as pydensecrf
builds it on x86 (its SSE path: ties round to even), so that points land in the same simplices.

The ladder (``VARIANTS``; one parametrised test holds each against ``reference``):

    reference   plain NumPy, every step a few array operations: read this one first
    cpu         one parallel Numba loop per step; the reference's sums in its order
    cpu_fast    cpu's steps scheduled for a few cores: hash-table build, scatter splat,
                SIMD rows, prefetches, the blur (or the whole filter) in one sweep
    cuda        numba.cuda kernels: sort-based build, chunked gather splat, one-launch blur

``DEFAULT`` names the one the library uses per device.  The dense CRF's mean field has fast
schedules of its own (``ENGINES``): ``cpu_fast.MeanFieldCPU`` and the whole inference in one
CUDA launch, ``cuda_mean_field.MeanFieldCUDA``; ``tinydeeplab.crf.DenseCRF.inference`` is the
plain loop they are tested against.
"""
import importlib
from collections import namedtuple

from .reference import LatticeReference, canonical_simplex, elevation_scale  # noqa: F401

Variant = namedtuple("Variant", "device module name description")

VARIANTS = {
    "reference": Variant("cpu", "reference", "LatticeReference",
                         "plain NumPy, the steps as array operations (the oracle)"),
    "cpu": Variant("cpu", "cpu", "LatticeCPUPlain", "one parallel Numba loop per step"),
    "cpu_fast": Variant("cpu", "cpu_fast", "LatticeCPU",
                        "hash-table build, scatter splat, SIMD rows, one-sweep blur/filter"),
    "cuda": Variant("cuda", "cuda", "LatticeCUDA",
                    "sort-based build, chunked gather splat, one-launch blur (numba.cuda)"),
}
DEFAULT = {"cpu": "cpu_fast", "cuda": "cuda"}

# mean-field engines: name -> (the lattice variant they run on, module, class, description)
Engine = namedtuple("Engine", "variant module name description")
ENGINES = {
    "cpu_fast": Engine("cpu_fast", "cpu_fast", "MeanFieldCPU",
                       "splats together, fused softmax, the spatial message in one sweep"),
    "cuda_one_launch": Engine("cuda", "cuda_mean_field", "MeanFieldCUDA",
                              "the whole inference in one cooperative CUDA launch"),
}


def _load(module, name):
    # imported on first use: the CUDA modules import numba.cuda, which reads
    # NUMBA_ENABLE_CUDASIM once, and CPU users never need it
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def variant_name(variant=None, device="cpu"):
    """``variant`` checked against VARIANTS and ``device``, or the default for ``device``."""
    name = DEFAULT[device] if variant is None else variant
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    if VARIANTS[name].device != device:
        raise ValueError(f"lattice variant {name!r} runs on the {VARIANTS[name].device}, "
                         f"not on device {device!r}")
    return name


def build(features, variant):
    """The lattice of ``VARIANTS[variant]`` for features (N, d) float32 (checked already)."""
    v = VARIANTS[variant]
    return _load(v.module, v.name)(features)


def engine_for(variant):
    """The name of the mean-field engine for lattices of ``variant``, or None (plain loop)."""
    for name, engine in ENGINES.items():
        if engine.variant == variant:
            return name
    return None


def make_engine(name, lattices, pres, posts, C):
    """Engine ``name`` for Potts kernels on ``lattices`` (built objects of its variant) with
    their per-point factors (``posts`` include the Potts weights), for C labels; it has
    ``run(unary (C, N), iterations) -> Q (C, N)``.  None where it cannot run here."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)} or 'plain', got {name!r}")
    e = ENGINES[name]
    return _load(e.module, e.name).make(lattices, pres, posts, C)
