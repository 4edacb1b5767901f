"""Lesson 7 — The permutohedral lattice: Gaussian filtering in d dimensions in linear time.

You will learn:
  * the three steps of Adams, Baek & Davis (2010): *splat* each point's value onto the corners
    of the lattice simplex around it, *blur* the lattice along its d+1 directions with a 1-2-1
    kernel, *slice* the result back at the points — drawn for 2-D features;
  * how close that is to the exact Gaussian filter Σ_j exp(−|f_i − f_j|²/2) v_j (brute force);
  * why the cost grows linearly with the number of pixels, where the exact sum grows
    quadratically — which is what makes a *fully connected* CRF affordable (lessons 8-10).

Run:  python lessons/07_permutohedral_lattice.py   (TDL_FAST=1 for a smaller, quicker run)
"""
# %% Setup
import os
import time

import tinydeeplab  # noqa: F401  first: its thread set-up must precede NumPy's (README)
import numpy as np

from tinydeeplab import crf, exercises, lessons
from tinydeeplab.kernels.permutohedral import reference as R

FAST = lessons.fast()  # TDL_FAST=1: a smaller run (the test suite's smoke test)
OUT = lessons.output_dir()  # figures and runs: $TDL_OUT, else ./lesson_out
rng = np.random.default_rng(0)

# %% 1. Elevate, find the simplex, weigh the corners (2-D features)
# Features f ∈ ℝ² are lifted onto the plane Σx = 0 of ℝ³ (the "elevation"), which the lattice
# tiles with triangles (in d dimensions: simplices with d+1 corners).  Each point gets the 3
# corners of its triangle and 3 barycentric weights that sum to 1 and rebuild its position.
# kernels/permutohedral/reference.py does each step as a few NumPy operations over all points
# (read it beside this lesson); here we call its steps one at a time.
d = 2
f = rng.uniform(0, 3, (12, d)).astype(np.float32)
elevated = R.elevate(f)  # (N, 3): step 1
rem0, rank = R.enclosing_simplex(elevated)  # step 2: the remainder-0 corner, the ranks
bary = R.barycentric(elevated, rem0, rank)  # step 3: (N, 3) weights
corner_keys = R.corner_keys(rem0, rank)  # (N, 3 corners, 2): first d coordinates
full = np.concatenate([corner_keys, -corner_keys.sum(2, keepdims=True)], 2)  # Σ = 0
rebuilt = (bary[:, :, None].astype(np.float64) * full).sum(1)
reference = R.LatticeReference(f)  # the same steps, then the vertices numbered
keys = np.concatenate([reference.vertex_keys, -reference.vertex_keys.sum(1, keepdims=True)], 1)
corners = reference.offsets.reshape(len(f), d + 1)  # vertex index of each point's corners
print(f"{len(f)} points, {reference.M} lattice vertices; barycentric weights rebuild "
      f"the elevated points to {np.abs(rebuilt - elevated).max():.1e}")
# The library's lattice (the fast CPU variant) builds the same lattice and filters alike:
lattice = crf.PermutohedralLattice(f)
v = rng.random((len(f), 3)).astype(np.float32)
print(f"library lattice: {lattice.num_vertices} vertices; filter max |difference| from the "
      f"reference {np.abs(lattice.filter(v) - reference.filter(v)).max():.1e}")
# to draw the plane Σx = 0, project onto two orthonormal vectors in it
basis = np.array([[1, -1, 0] / np.sqrt(2), [1, 1, -2] / np.sqrt(6)]).T

# %% 2. Splat, blur, slice — what happens to the values (1-D features, easiest to see)
# With d = 1 the lattice is a line of vertices; splatting is linear interpolation onto the two
# neighbouring vertices, the blur is [1 2 1]/2 per direction (d+1 = 2 of them), slicing reads back
# with the same weights.  Splat is the transpose of slice, so the whole filter is symmetric.
x1 = np.sort(rng.uniform(0, 12, 40)).astype(np.float32)[:, None]
v1 = (np.sin(x1[:, 0]) > 0).astype(np.float32)  # a square wave
lat1 = R.LatticeReference(x1)
splatted = lat1.splat(v1[:, None])  # (M, 1): each vertex's share of the nearby values
blurred = lat1.blur(splatted)  # 1-2-1 along each direction
filtered = lat1.slice_(blurred)[:, 0]  # back at the points
ones = lat1.filter(np.ones_like(v1)[:, None])[:, 0]
smooth = filtered / ones  # normalised, as the CRF uses it
exact_w = np.exp(-0.5 * (x1 - x1.T) ** 2)
exact = exact_w @ v1 / exact_w.sum(1)
print(f"1-D: {len(x1)} points on {lat1.M} vertices; normalised filter vs exact: "
      f"max |difference| {np.abs(smooth - exact).max():.3f}")

# %% 3. Error against the exact filter, d = 2 and d = 5 (the CRF's two kernels)
# The lattice blurs with a slightly different kernel than exp(−|Δf|²/2) and its overall scale is
# off by a constant.  The CRF normalises each kernel symmetrically, as densecrf does: with
# n = 1/√(K·1), it uses n ⊙ K(n ⊙ v) — which also removes the scale.  Here, to compare with the
# exact filter row by row, we divide by the filtered ones instead.
errors = {}
for dim in (2, 5):
    fd = (rng.random((400, dim)) * 3).astype(np.float32)
    vd = rng.random((400, 3)).astype(np.float32)
    K = np.exp(-0.5 * ((fd[:, None].astype(np.float64) - fd[None]) ** 2).sum(-1))
    latd = crf.PermutohedralLattice(fd)
    approx = latd.filter(vd) / latd.filter(np.ones(400, np.float32))[:, None]
    exact_d = (K @ vd) / K.sum(1, keepdims=True)
    errors[dim] = float(np.sqrt(((approx - exact_d) ** 2).mean() / (exact_d ** 2).mean()))
    print(f"d = {dim}: normalised filter, relative RMS error {errors[dim]:.4f}")

# %% 4. Linear cost
# Each point touches d+1 vertices, there are at most (d+1)·N vertices and each blur pass visits
# each vertex once: O(d²·N) in all.  The exact sum is N² kernel evaluations.
sizes = [2000, 8000, 32000] if FAST else [10000, 40000, 160000, 640000]
lattice_times, vertices = [], []
for n in sizes:
    side = int(np.sqrt(n))
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    # photograph-like colours: smooth shading plus sensor noise
    shade = 128 + 100 * np.sin(xx / 37.0)[..., None] * np.cos(yy[..., None] / 23.0 + np.arange(3))
    colour = (shade + rng.normal(0, 4, shade.shape)).reshape(-1, 3).astype(np.float32)
    feats = np.column_stack([xx.ravel() / 60, yy.ravel() / 60, colour / 10])  # bilateral, d = 5
    values = rng.random((side * side, 21)).astype(np.float32)
    # run once untimed at this very size: the first call compiles (seconds), and which
    # schedule runs depends on the size (cpu_fast's rules), so a small warm-up is not enough
    crf.PermutohedralLattice(feats).filter(values)
    t0 = time.perf_counter()
    lat = crf.PermutohedralLattice(feats)
    lat.filter(values)
    lattice_times.append(time.perf_counter() - t0)
    vertices.append(lat.num_vertices / (side * side))
brute_sizes = [500, 1000, 2000] if FAST else [1000, 2000, 4000]
brute_times = []
for n in brute_sizes:
    fb = rng.random((n, 5)).astype(np.float32)
    vb = rng.random((n, 21)).astype(np.float32)
    t0 = time.perf_counter()
    np.exp(-0.5 * ((fb[:, None] - fb[None]) ** 2).sum(-1)) @ vb
    brute_times.append(time.perf_counter() - t0)
for n, t, m in zip(sizes, lattice_times, vertices):
    print(f"N = {n:7d}: lattice build + filter of 21 channels {t * 1e3:8.1f} ms, "
          f"{m:.2f} vertices per point")
for n, t in zip(brute_sizes, brute_times):
    print(f"N = {n:7d}: exact sum {t * 1e3:8.1f} ms  (a 500×375 image would take "
          f"~{t * (187500 / n) ** 2:.0f} s)")

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(1, 3, figsize=(14, 4))
P = elevated @ basis
V = keys @ basis
ax[0].scatter(V[:, 0], V[:, 1], s=30, c="k", marker="s", label="lattice vertices used")
for n in range(len(f)):
    tri = V[corners[n]]
    ax[0].fill(tri[:, 0], tri[:, 1], alpha=0.08, color="tab:blue")
    for c in tri:
        ax[0].plot([P[n, 0], c[0]], [P[n, 1], c[1]], lw=0.5, color="tab:blue")
ax[0].scatter(P[:, 0], P[:, 1], s=20, c="tab:red", label="points (elevated)")
ax[0].set_aspect("equal")
ax[0].legend(fontsize=7)
ax[0].set_title("splat: each point onto the 3 corners of its triangle", fontsize=9)
ax[1].plot(x1[:, 0], v1, "o", ms=3, label="values")
ax[1].plot(x1[:, 0], smooth, label="lattice: splat, blur, slice")
ax[1].plot(x1[:, 0], exact, "--", label="exact Gaussian")
ax[1].legend(fontsize=7)
ax[1].set_title("1-D: the normalised filter", fontsize=9)
ax[2].loglog(sizes, lattice_times, "o-", label="lattice (d = 5, 21 values)")
ax[2].loglog(brute_sizes, brute_times, "s-", label="exact sum")
ax[2].set_xlabel("points N")
ax[2].set_ylabel("seconds")
ax[2].legend(fontsize=7)
ax[2].set_title("linear versus quadratic", fontsize=9)
fig.savefig(os.path.join(OUT, "07_permutohedral_lattice.png"), dpi=90, bbox_inches="tight")
plt.close(fig)

# %% Check
assert np.abs(rebuilt - elevated).max() < 1e-4, "barycentric weights must rebuild the points"
assert np.allclose(bary.sum(1), 1, atol=1e-5) and (bary >= -1e-6).all()
assert lattice.num_vertices == reference.M  # the library's lattice is the reference's
assert np.allclose(lattice.filter(v), reference.filter(v), rtol=1e-5, atol=1e-6)
assert np.abs(smooth - exact).max() < 0.1
assert errors[2] < 0.01 and errors[5] < 0.025  # the bands of tests/test_lattice.py
# each point has d+1 = 6 corners, but neighbouring pixels share them: far fewer vertices than
# 6 per point (without the sharing the lattice would have 6N of them)
assert max(vertices) < 1, f"{max(vertices):.2f} vertices per point: corners are not shared"
print("Check passed.")

# %% Exercise — splat as loops (a solution: lessons/solutions/07_permutohedral_lattice.py)
# Write the splat with plain loops: every point n adds bary[n, k] · values[n] to the vertex
# of its corner k, offsets[n·(d+1) + k], on a reference lattice (R.LatticeReference).  Return
# the (M, c) vertex values; the check compares with the reference's splat.
def splat(lattice, values):
    raise NotImplementedError("your code here")


exercises.run(exercises.check_splat, splat)

# %% Summary — read next
# * The lattice filters in d dimensions in three steps: splat onto the corners of each
#   point's simplex, blur 1-2-1 along the d+1 lattice directions, slice back.
# * Its error against the exact Gaussian is a few per cent after normalisation, and its cost
#   grows linearly with the points: kernels/permutohedral/reference.py is the whole algorithm
#   in NumPy, cpu.py the same in parallel loops, cpu_fast*.py the fast version.
# Next: lesson 08 — the fully connected CRF built on it (CRF track 07 → 08 → 10).
