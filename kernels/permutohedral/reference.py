"""The permutohedral lattice in plain NumPy: the reference every other variant is tested against.

Read it next to Adams, Baek & Davis (2010), §3-4; the package docstring has the math.  Every
step is a few array operations over all points at once, float32 in the order of Krähenbühl's
densecrf (as pydensecrf builds it on x86), so that points land in the same simplices as there
and the lattice itself (simplices, barycentric weights, vertex numbers) is equal bit for bit to
the faster variants'.  Filtering is in the dtype of the values (float32 or float64).
"""
import numpy as np


def elevation_scale(d):
    """s_i of step 1, rounded as densecrf does (its constant √(2/3)·(d+1) is a float32)."""
    inv_std = np.float64(np.float32(np.sqrt(2.0 / 3.0) * (d + 1)))
    return np.array([1.0 / np.sqrt((i + 1) * (i + 2)) * inv_std for i in range(d)],
                    dtype=np.float32)


def canonical_simplex(d):
    """canonical[k, j]: offset of vertex k of the canonical simplex for rank j."""
    c = np.empty((d + 1, d + 1), dtype=np.int32)
    for k in range(d + 1):
        c[k, : d + 1 - k] = k
        c[k, d + 1 - k:] = k - (d + 1)
    return c


def elevate(features):
    """Step 1: features (N, d) float32 → points on the hyperplane Σx = 0 of ℝ^(d+1), (N, d+1).

    elevated[j] = Σ_{i ≥ j} s_i f_i − j · s_{j−1} f_{j−1}, summed from the last feature down."""
    N, d = features.shape
    scale = elevation_scale(d)
    elevated = np.empty((N, d + 1), dtype=np.float32)
    running = np.zeros(N, dtype=np.float32)
    for j in range(d, 0, -1):
        scaled = features[:, j - 1] * scale[j - 1]
        elevated[:, j] = running - np.float32(j) * scaled
        running += scaled
    elevated[:, 0] = running
    return elevated


def enclosing_simplex(elevated):
    """Step 2: (rem0, rank), each (N, d+1): the remainder-0 vertex of the simplex enclosing each
    point, and the rank of each coordinate (how many coordinates lie further above their
    remainder-0 value) — which of the d+1 vertices, with canonical_simplex, are its corners."""
    N, d1 = elevated.shape
    d = d1 - 1
    down, up = np.float32(1.0) / np.float32(d1), np.float32(d1)
    # the nearest multiple of d+1 of every coordinate; ties to even, as densecrf's SSE build
    r = np.rint((down * elevated).astype(np.float64))
    rem0 = r.astype(np.float32) * up
    diff = elevated - rem0
    # rank[i] = #{j < i: diff[j] ≥ diff[i]} + #{j > i: diff[j] > diff[i]}: sorting, with ties
    # broken by position, so that the ranks are a permutation of 0..d
    rank = np.zeros((N, d1), dtype=np.int64)
    for i in range(d1):
        for j in range(d1):
            if j < i:
                rank[:, i] += diff[:, j] >= diff[:, i]
            elif j > i:
                rank[:, i] += diff[:, j] > diff[:, i]
    # the rounded point is off the plane by Σr multiples of d+1: move the coordinates of the
    # lowest (or highest) ranks by d+1 to put it back, and their ranks with them
    rank += r.sum(axis=1, dtype=np.int64)[:, None]
    move = (rank < 0).astype(np.int64) - (rank > d)
    rank += d1 * move
    rem0 += up * move.astype(np.float32)
    return rem0, rank


def barycentric(elevated, rem0, rank):
    """Step 3: (N, d+1) float32 weights of each point's d+1 corners (corner k: rem0 plus
    canonical_simplex(d)[k] permuted by rank); they sum to 1."""
    N, d1 = elevated.shape
    d = d1 - 1
    v = (elevated - rem0) * (np.float32(1.0) / np.float32(d1))
    b = np.zeros((N, d + 2), dtype=np.float32)
    rows = np.arange(N)
    for i in range(d1):
        b[rows, d - rank[:, i]] += v[:, i]
        b[rows, d - rank[:, i] + 1] -= v[:, i]
    b[:, 0] += np.float32(1.0) + b[:, d + 1]
    return b[:, :d1]


def corner_keys(rem0, rank):
    """(N, d+1, d) int64: the first d coordinates of every corner of every point's simplex (the
    last coordinate follows from Σ = 0, so d of them name a lattice point)."""
    d = rank.shape[1] - 1
    canonical = canonical_simplex(d)
    keys = rem0[:, None, :d].astype(np.int64) + canonical[:, rank[:, :d]].transpose(1, 0, 2)
    return keys


def number_vertices(keys):
    """(vertex_keys (M, d), offsets (K,)): the distinct rows of keys (K, d), numbered in order of
    first appearance, and the number of each row's key.  (Points next to each other in the
    image then use vertices next to each other in memory.)"""
    unique, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    by_appearance = np.argsort(first, kind="stable")
    number = np.empty(len(unique), dtype=np.int64)
    number[by_appearance] = np.arange(len(unique))
    return unique[by_appearance], number[inverse.ravel()]


def find_rows(table, queries):
    """The index of each row of ``queries`` among the rows of ``table`` (distinct), −1 if
    absent: in the sorted union, a query's first occurrence is a table row iff it is there."""
    both = np.concatenate([table, queries])
    _, first, inverse = np.unique(both, axis=0, return_index=True, return_inverse=True)
    found = first[inverse.ravel()[len(table):]]
    return np.where(found < len(table), found, -1)


def blur_neighbours(vertex_keys):
    """(d+1, M, 2) int64: the vertices one lattice step forward (side 0) and back (side 1) along
    each direction j, −1 where there is none.  Step j is +d in coordinate j and −1 in all
    others (for j = d that +d falls on the implicit last coordinate)."""
    M, d = vertex_keys.shape
    neighbours = np.empty((d + 1, M, 2), dtype=np.int64)
    for j in range(d + 1):
        step = np.full(d, -1, dtype=np.int64)
        if j < d:
            step[j] = d
        neighbours[j, :, 0] = find_rows(vertex_keys, vertex_keys + step)
        neighbours[j, :, 1] = find_rows(vertex_keys, vertex_keys - step)
    return neighbours


class LatticeReference:
    """The lattice for features (N, d), built once; ``filter`` any number of times.

    ``filter(values, reverse=False, pre=None, post=None, out=None, base=None)``: out = base +
    post ⊙ F(pre ⊙ values) with F the Gaussian filter (Fᵀ with ``reverse``); ``out`` given
    and no ``base``: the result is added to ``out``.  Or the three steps one by one:
    ``slice_(blur(splat(values)))``."""

    def __init__(self, features):
        features = np.ascontiguousarray(features, dtype=np.float32)
        self.N, self.d = features.shape
        elevated = elevate(features)
        rem0, rank = enclosing_simplex(elevated)
        self.bary = barycentric(elevated, rem0, rank)  # (N, d+1)
        keys = corner_keys(rem0, rank).reshape(-1, self.d)  # (N·(d+1), d)
        self.vertex_keys, self.offsets = number_vertices(keys)  # corner n·(d+1)+k: offsets
        self.M = len(self.vertex_keys)
        self.neighbours = blur_neighbours(self.vertex_keys)
        self.alpha = np.float32(1.0 / (1.0 + 2.0 ** (-self.d)))

    def splat(self, values, pre=None):
        """Step 4: (M, c) vertex values, Σ over the points of weight · pre · value, summed
        point by point (np.add.at keeps the order)."""
        dt = values.dtype
        w = self.bary.astype(dt)
        if pre is not None:
            w = w * np.asarray(pre).astype(dt)[:, None]
        w = w.ravel()  # (N·(d+1),): corner n·(d+1) + k
        buf = np.zeros((self.M, values.shape[1]), dtype=dt)
        np.add.at(buf, self.offsets, w[:, None] * np.repeat(values, self.d + 1, axis=0))
        return buf

    def blur(self, buf, reverse=False):
        """Step 5: along each direction in turn (reversed order for Fᵀ), every vertex gets
        half the sum of its two neighbours added (the 1-2-1 kernel, halved; none counts 0)."""
        for j in (range(self.d, -1, -1) if reverse else range(self.d + 1)):
            ahead, behind = self.neighbours[j, :, 0], self.neighbours[j, :, 1]
            zero = np.zeros_like(buf[:1])
            left = np.where(ahead[:, None] >= 0, buf[ahead], zero)
            right = np.where(behind[:, None] >= 0, buf[behind], zero)
            buf = buf + buf.dtype.type(0.5) * (left + right)
        return buf

    def slice_(self, buf, post=None, out=None, base=None):
        """Step 6: every point reads back Σ_k weight_k · vertex value of corner k, times
        α = 1/(1 + 2^−d) and post, corner by corner onto base (or out, or 0)."""
        dt = buf.dtype.type
        p = dt(self.alpha) if post is None else post.astype(dt) * dt(self.alpha)
        w = self.bary.astype(dt) * (p if np.ndim(p) == 0 else p[:, None])
        start = base if base is not None else out
        result = np.zeros((self.N, buf.shape[1]), dt) if start is None else start.astype(dt)
        corner = self.offsets.reshape(self.N, self.d + 1)
        for k in range(self.d + 1):
            result = result + w[:, k:k + 1] * buf[corner[:, k]]
        if out is not None:
            out[...] = result
            return out
        return result

    def filter(self, values, reverse=False, pre=None, post=None, out=None, base=None):
        values = np.asarray(values)
        values = values.astype(np.float64 if values.dtype == np.float64 else np.float32)
        return self.slice_(self.blur(self.splat(values, pre), reverse), post, out, base)
