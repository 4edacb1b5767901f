"""Lesson 15 — The CRF on the GPU: a lattice built by sorting, splats in chunks, one launch.

You will learn:
  * why the GPU lattice numbers its vertices by sorting the keys instead of inserting them in
    a hash table, and that the two lattices filter alike;
  * why splatting gathers in chunks: how unevenly the points fall on the vertices of a real
    photograph, and what chunks of 32 do to the longest job of one thread;
  * why the blur's d + 1 passes run in one launch, a grid-wide barrier between them;
  * why the whole mean field runs as one cooperative launch — the launch count before and
    after, and (on a GPU only) the time.

Each step runs on a small crop under Numba's CUDA simulator when there is no GPU (every thread
a Python thread: correct, counted, not timed); the statistics of section 2 come from the whole
photograph, in NumPy.

Run:  python lessons/15_the_gpu_crf.py   (TDL_FAST=1 for a smaller, quicker run)
"""
# %% Setup — without a GPU, CUDA kernels run on Numba's simulator (chosen before numba.cuda loads)
import os
import time

from tinydeeplab import lessons

GPU = lessons.gpu_or_simulator()
if GPU:
    import cupy

import numpy as np  # noqa: E402

from tinydeeplab import crf, exercises  # noqa: E402
from tinydeeplab.benchmarks.profile_crf import LaunchCounter  # noqa: E402
from tinydeeplab.kernels.permutohedral import reference as R  # noqa: E402

FAST = lessons.fast()  # TDL_FAST=1: a smaller run (the test suite's smoke test)
OUT = lessons.output_dir()  # figures and runs: $TDL_OUT, else ./lesson_out
rng = np.random.default_rng(0)
print("running on", "a GPU: " + cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
      if GPU else "Numba's CUDA simulator (no GPU): logic and launch counts only, no timings")
to_dev = cupy.asarray if GPU else np.asarray  # the GPU path takes CuPy arrays, the simulator
to_host = cupy.asnumpy if GPU else np.asarray  # NumPy ones

# The photograph of lesson 8 and the bilateral kernel's features: position / 67, colour / 3
# (DeepLab's bi_xy_std and bi_rgb_std): d = 5 dimensions per pixel.
photo, label, names = lessons.photograph()
photo = photo[:336]  # the annotated rows (lesson 8)


def bilateral_features(image):
    h, w, _ = image.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.concatenate([np.stack([xx.ravel(), yy.ravel()], 1) / np.float32(67),
                           image.reshape(-1, 3).astype(np.float32) / np.float32(3)], 1)


# %% 1. Building the lattice: a hash table, or a sort
# Every pixel lands in a simplex of the lattice and touches its d + 1 corners (lesson 7): N·(d+1)
# corner keys, many repeated.  The CPU numbers the distinct keys with a hash table, inserting
# them one after another.  On a GPU, thousands of threads inserting at once need atomic
# operations, and which thread wins decides the numbering — a different vertex order on every
# run.  The GPU lattice sorts instead: after a stable sort of the keys, equal keys sit side by
# side, a vertex is a run of equal keys, and a prefix sum over "this key differs from the one
# before" numbers the runs.  In NumPy, on a crop:
h, w = (12, 16) if FAST else (24, 32)
crop = np.ascontiguousarray(photo[100:100 + h, 280:280 + w])  # the rocket's edge and the sky
features = bilateral_features(crop)
elevated = R.elevate(features)
rem0, rank = R.enclosing_simplex(elevated)
keys = R.corner_keys(rem0, rank).reshape(-1, features.shape[1])  # (N·(d+1), d)
order = np.lexsort(keys.T[::-1])  # stable, first coordinate first
sorted_keys = keys[order]
new_vertex = np.ones(len(keys), bool)
new_vertex[1:] = (sorted_keys[1:] != sorted_keys[:-1]).any(1)
vertex_of_key = np.empty(len(keys), np.int64)
vertex_of_key[order] = np.cumsum(new_vertex) - 1  # the vertex each corner key belongs to
M = int(new_vertex.sum())
print(f"{w}×{h} crop: {len(keys)} corner keys, {M} vertices by sorting")
# The library's GPU lattice does the same on the device; the reference numbers the vertices in
# order of first appearance instead.  The numbering differs, the filter must not:
values = rng.standard_normal((h * w, 3)).astype(np.float32)
gpu_lattice = crf.PermutohedralLattice(to_dev(features), device="cuda")
reference = crf.PermutohedralLattice(features, variant="reference")
filter_gap = float(np.abs(to_host(gpu_lattice.filter(to_dev(values)))
                          - reference.filter(values)).max())
print(f"vertices: GPU lattice {gpu_lattice.num_vertices}, reference {reference.num_vertices}; "
      f"filters differ by at most {filter_gap:.1e}")

# %% 2. Splatting gathers, in chunks
# Splatting adds each point's value, times its barycentric weight, into its d + 1 vertices.
# Written as a scatter (one thread per point), threads would collide on the same vertex and
# need atomics: float sums then depend on thread timing.  Written as a gather (one thread per
# vertex, summing its members — the sorted runs above are exactly the member lists) every sum
# has a fixed order.  But how long are the lists?  On the whole photograph:
full_keys = R.corner_keys(*R.enclosing_simplex(R.elevate(bilateral_features(photo))))
full_keys = full_keys.reshape(-1, 5)
_, members = np.unique(full_keys, axis=0, return_counts=True)
CHUNK = 32  # the library's chunk: kernels/permutohedral/cuda.py, SPLAT_CHUNK
chunks = -(-members // CHUNK)
print(f"whole photograph: {len(full_keys)} keys on {len(members)} vertices; members per vertex: "
      f"median {int(np.median(members))}, 99th percentile {int(np.percentile(members, 99))}, "
      f"largest {members.max()}")
print(f"  one thread per vertex: the longest thread sums {members.max()} members, "
      f"{members.max() / members.mean():.0f}× the average")
print(f"  chunks of {CHUNK}: {chunks.sum()} threads (for {len(members)} vertices), none sums "
      f"more than {CHUNK}; then the {(chunks > 1).sum()} vertices with several chunks add "
      f"their chunks' sums, in order")
# Sky: flat colour over a wide area, so hundreds to thousands of pixels share a vertex of the
# bilateral lattice; a thread summing those alone would hold up the whole launch.

# %% 3. The blur: d + 1 passes, one launch
# The blur filters along each of the d + 1 lattice directions in turn; each pass reads what the
# previous one wrote, for every vertex.  Between two passes every thread must have finished:
# on a GPU the end of a launch is such a barrier, so the plain way is one launch per pass.  A
# launch costs the host tens of microseconds of Python, often more than the pass itself, so
# the library runs all passes in one launch and waits at a grid-wide barrier
# (cuda.cg.this_grid().sync()) between them.  That needs every block resident on the GPU at
# once (a cooperative launch): the grid is capped at what fits, each thread striding over
# several vertices.  Launches of one filter, counted (the lattice's own splat/blur/slice):
lattice = gpu_lattice.kernel
launches, outputs = {}, {}
for one_launch in (False, True):
    with LaunchCounter() as counter:
        lattice.splat(to_dev(values))
        blurred = lattice.blur(one_launch=one_launch)
        outputs[one_launch] = to_host(lattice.slice(blurred))
    launches[one_launch] = counter.count
blur_gap = float(np.abs(outputs[True] - outputs[False]).max())
print(f"one filter, d = 5: {launches[False]} launches pass by pass (splat 2, blur 6, slice 1), "
      f"{launches[True]} with the one-launch blur; results differ by {blur_gap:.1e}")

# %% 4. The whole mean field in one launch
# A mean-field iteration with DeepLab's two kernels is, per kernel, splat, blur and slice, then
# a softmax: ten iterations are ~90 launches.  Where every kernel is Potts, the library lays
# the two lattices side by side in one vertex buffer and runs all iterations in one cooperative
# launch, barriers between the steps (kernels/permutohedral/cuda_mean_field.py).
probs = rng.dirichlet(np.ones(3), size=(h, w)).transpose(2, 0, 1).astype(np.float32)
iterations = 5
engines, q = {}, {}
for engine in (None, "plain"):  # None: the library's choice, the one-launch kernel
    model = crf.DenseCRF2D(w, h, 3, device="cuda")
    model.setUnaryEnergy(to_dev(crf.unary_from_softmax(probs)))
    model.addPairwiseGaussian(sxy=1, compat=3)
    model.addPairwiseBilateral(sxy=67, srgb=3, rgbim=crop, compat=4)
    with LaunchCounter() as counter:
        q[engine] = to_host(model.inference(iterations, engine))
    engines[engine] = counter.count
cpu_q = crf.dense_crf(crop, probs, iterations=iterations, device="cpu").reshape(3, -1)
mean_field_gap = float(np.abs(q[None] - q["plain"]).max())
cpu_gap = float(np.abs(q[None] - cpu_q).max())
print(f"{iterations} iterations: {engines['plain']} launches step by step, {engines[None]} with "
      f"the one-launch mean field (the first run's set-up included: one launch per lattice "
      f"lays it into the shared buffer); Q differs by {mean_field_gap:.1e} (from the CPU's by "
      f"{cpu_gap:.1e})")

if GPU:  # the time, on the whole photograph: only a real GPU's means anything
    p_full = rng.dirichlet(np.ones(3), size=photo.shape[:2]).transpose(2, 0, 1)
    p_full = p_full.astype(np.float32)
    timings = {}
    for engine in (None, "plain"):
        model = crf.DenseCRF2D(photo.shape[1], photo.shape[0], 3, device="cuda")
        model.setUnaryEnergy(cupy.asarray(crf.unary_from_softmax(p_full)))
        model.addPairwiseGaussian(sxy=1, compat=3)
        model.addPairwiseBilateral(sxy=67, srgb=3, rgbim=photo, compat=4)
        model.inference(10, engine)  # compile, fill the memory pool
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        for _ in range(5):
            model.inference(10, engine)
        cupy.cuda.Device().synchronize()
        timings[engine] = (time.perf_counter() - start) / 5
    print(f"whole photograph ({photo.shape[1]}×{photo.shape[0]}), 10 iterations: one launch "
          f"{timings[None] * 1e3:.2f} ms, step by step {timings['plain'] * 1e3:.2f} ms")
else:
    print("timings need a GPU (benchmarks/profile_crf.py --device cuda measures them there)")

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
ax[0].hist(members, bins=np.logspace(0, np.log10(members.max()), 40))
ax[0].set_xscale("log")
ax[0].set_yscale("log")
ax[0].axvline(CHUNK, color="k", ls=":")
ax[0].set_xlabel("members of a vertex (log)")
ax[0].set_ylabel("vertices")
ax[0].set_title(f"bilateral lattice of the photograph; dotted: chunk of {CHUNK}", fontsize=9)
ax[1].bar(["filter,\npass by pass", "filter,\none-launch blur", f"mean field ×{iterations},\n"
           "step by step", f"mean field ×{iterations},\none launch"],
          [launches[False], launches[True], engines["plain"], engines[None]])
ax[1].set_ylabel("kernel launches")
ax[1].tick_params(labelsize=8)
fig.tight_layout()
fig.savefig(os.path.join(OUT, "15_gpu_crf.png"), dpi=90, bbox_inches="tight")
plt.close(fig)

# %% Check
assert gpu_lattice.num_vertices == reference.num_vertices == M
assert filter_gap < 1e-4 and blur_gap < 1e-5
assert launches[True] < launches[False]
assert engines[None] < engines["plain"] / 10, "the one-launch mean field must launch far less"
assert mean_field_gap < 1e-5 and cpu_gap < 1e-4
assert members.max() > 50 * CHUNK, "the photograph's lists are that uneven"
print("Check passed.")

# %% Exercise — vertices by sorting (a solution: lessons/solutions/15_the_gpu_crf.py)
# Section 1 in your own words: given the corner keys (K, d) ints, return (vertex, M): the
# vertex number of each key, vertices numbered in lexicographic order of their keys, and the
# number of vertices.  The check compares with NumPy's unique rows.
def number_by_sorting(keys):
    raise NotImplementedError("your code here")


exercises.run(exercises.check_number_by_sorting, number_by_sorting)

# %% Summary — read next
# * On a GPU the lattice's vertices come from a sort, not a hash table: the numbering is the
#   same on every run and the filter equals the CPU's.
# * Splats gather per vertex in chunks of 32, because a flat sky puts thousands of pixels on
#   one vertex; no atomics, a fixed order of summation.
# * Launches cost the host more than the work: the blur's passes and then the whole mean
#   field run in one cooperative launch, with grid-wide barriers between steps.
# Next: lesson 16 — the capstone, the paper's ablation table at lesson scale.
