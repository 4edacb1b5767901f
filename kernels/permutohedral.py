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
4. **Splat**: every vertex accumulates Σ weight · value of the points around it.
5. **Blur**: along each of the d+1 lattice directions, new = old + ½ (left + right) — the
   1-2-1 kernel, halved — with missing neighbours counting as 0.
6. **Slice**: every point reads back Σ weight · vertex value, times α = 1 / (1 + 2^−d)
   (the normalisation of the sum of the blurred simplex weights).

Transposed filter ("reverse", used for gradients): splat and slice are each other's
transposes and each blur step is symmetric, so the transpose only reverses the order of the
blur directions.

Vertices are deduplicated with a hash table on their first d coordinates (the last follows from
the zero sum).  Keys are int32, so features up to ~10^8 / d cannot overflow — pydensecrf uses
16-bit keys, which wrap for large images with small spatial widths.
The arithmetic of steps 1-3 is float32 in the order of Krähenbühl's densecrf as pydensecrf
builds it on x86 (its SSE path: ties round to even), so that points land in the same simplices.
"""
import math
import threading

import numba
import numpy as np
from numba import njit, prange

from . import parallel_njit

EMPTY = -1


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


# ---- CPU: steps 1-3, one point per iteration ---------------------------------------------------
def _round_half_even(x):
    # the SSE rounding of densecrf's x86 build (_mm_round_ps / cvtps: ties to even)
    r = math.floor(x + 0.5)
    if r - x == 0.5 and r % 2 != 0:
        r -= 1
    return r


def _simplices(features, scale, canonical, keys, bary):
    # features (N, d) float32 -> keys (N, d+1, d) int32 vertex coordinates, bary (N, d+1)
    N, d = features.shape
    f32 = np.float32
    down, up = f32(1.0) / f32(d + 1), f32(d + 1)
    for n in prange(N):
        elevated = np.empty(d + 1, dtype=np.float32)
        rem0 = np.empty(d + 1, dtype=np.float32)
        rank = np.zeros(d + 1, dtype=np.int32)
        b = np.zeros(d + 2, dtype=np.float32)
        sm = f32(0.0)
        for j in range(d, 0, -1):
            cf = features[n, j - 1] * scale[j - 1]
            elevated[j] = sm - f32(j) * cf
            sm += cf
        elevated[0] = sm
        total = 0
        for i in range(d + 1):
            rd = int(_round_half_even(down * elevated[i]))
            rem0[i] = f32(rd) * up
            total += rd
        for i in range(d):
            di = elevated[i] - rem0[i]
            for j in range(i + 1, d + 1):
                if di < elevated[j] - rem0[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):  # back onto the plane Σ x = 0
            rank[i] += total
            if rank[i] < 0:
                rank[i] += d + 1
                rem0[i] += up
            elif rank[i] > d:
                rank[i] -= d + 1
                rem0[i] -= up
        for i in range(d + 1):
            v = (elevated[i] - rem0[i]) * down
            b[d - rank[i]] += v
            b[d - rank[i] + 1] -= v
        b[0] += f32(1.0) + b[d + 1]  # float32, as densecrf's SSE build
        for k in range(d + 1):
            for i in range(d):
                keys[n, k, i] = int(rem0[i]) + canonical[k, rank[i]]
            bary[n, k] = b[k]


# ---- CPU: the hash table (serial insert, parallel lookups) -------------------------------------
def _hash(key):
    h = np.uint64(0)
    for i in range(key.shape[0]):
        h = (h + np.uint64(np.int64(key[i]) & 0xFFFFFFFF)) * np.uint64(2531011)
    return h


def _lookup(table, vertex_keys, key):
    """Index of the vertex with this key, or EMPTY."""
    mask = np.uint64(table.shape[0] - 1)
    slot = _hash(key) & mask
    while True:
        v = table[slot]
        if v == EMPTY:
            return EMPTY
        same = True
        for i in range(key.shape[0]):
            if vertex_keys[v, i] != key[i]:
                same = False
                break
        if same:
            return v
        slot = (slot + np.uint64(1)) & mask


def _insert_all(keys, table, vertex_keys, offsets):
    # keys (K, d): give each distinct key a vertex index, in order of first appearance.
    # Returns (M, table).  The table starts small and doubles whenever it is half full: a table
    # sized for the worst case (every point its own d+1 vertices) would be 10-20× too large
    # and every probe a cache miss.
    M = 0
    for e in range(keys.shape[0]):
        if 2 * (M + 1) > table.shape[0]:
            table = _grow(table, vertex_keys, M)
        mask = np.uint64(table.shape[0] - 1)
        key = keys[e]
        slot = _hash(key) & mask
        while True:
            v = table[slot]
            if v == EMPTY:
                table[slot] = M
                vertex_keys[M] = key
                offsets[e] = M
                M += 1
                break
            same = True
            for i in range(key.shape[0]):
                if vertex_keys[v, i] != key[i]:
                    same = False
                    break
            if same:
                offsets[e] = v
                break
            slot = (slot + np.uint64(1)) & mask
    return M, table


def _grow(table, vertex_keys, M):
    # a table twice the size holding vertices 0..M-1 (no duplicates, so no key comparisons)
    bigger = np.full(2 * table.shape[0], EMPTY, dtype=table.dtype)
    mask = np.uint64(bigger.shape[0] - 1)
    for v in range(M):
        slot = _hash(vertex_keys[v]) & mask
        while bigger[slot] != EMPTY:
            slot = (slot + np.uint64(1)) & mask
        bigger[slot] = v
    return bigger


def _blur_neighbours(table, vertex_keys, M, neighbours):
    # neighbours (d+1, M, 2): 1 + index of the vertex one step back / forward along each
    # lattice direction j (0 = no such vertex).  Step along j: every coordinate −1, coordinate
    # j +d (so the sum stays 0); the last coordinate is implicit in the key.
    d = vertex_keys.shape[1]
    for v in prange(M):
        n1 = np.empty(d, dtype=np.int32)
        n2 = np.empty(d, dtype=np.int32)
        for j in range(d + 1):
            for i in range(d):
                n1[i] = vertex_keys[v, i] - 1
                n2[i] = vertex_keys[v, i] + 1
            if j < d:
                n1[j] = vertex_keys[v, j] + d
                n2[j] = vertex_keys[v, j] - d
            neighbours[j, v, 0] = _lookup(table, vertex_keys, n1) + 1
            neighbours[j, v, 1] = _lookup(table, vertex_keys, n2) + 1


def _group_by_vertex(offsets, M, starts, members):
    # counting sort of the K = N·(d+1) (point, vertex) pairs by vertex, stable in point order,
    # so splatting can be done per vertex (a gather) without races: members[starts[v]:starts[v+1]]
    for e in range(offsets.shape[0]):
        starts[offsets[e] + 2] += 1
    for v in range(M):
        starts[v + 2] += starts[v + 1]
    for e in range(offsets.shape[0]):
        v = offsets[e]
        members[starts[v + 1]] = e
        starts[v + 1] += 1


# ---- CPU: splat, blur, slice ---------------------------------------------------------------------
def _splat_gather(values, pre, bary, starts, members, buf):
    # buf (M+1, c): row 0 is the "missing neighbour" zero row; each vertex sums its points
    # (values scaled by pre[n], the CRF's kernel normalisation).  No two iterations write the
    # same row, so no races — but the points of one vertex are scattered over the image.
    d1 = bary.shape[1]
    c = values.shape[1]
    for v in prange(buf.shape[0] - 1):
        for k in range(c):
            buf[v + 1, k] = 0
        for m in range(starts[v], starts[v + 1]):
            e = members[m]
            n, r = e // d1, e % d1
            w = bary[n, r] * pre[n]
            for k in range(c):
                buf[v + 1, k] += w * values[n, k]


def _splat_scatter(values, pre, bary, offsets, private, buf):
    # The same sum in point order: thread t scatters a contiguous block of points into a
    # buffer of its own (thread 0 into buf itself, thread t ≥ 1 into private[t − 1]), reading
    # values sequentially; then the private copies are added into buf.  Faster when there are
    # few vertices per point (wide kernels).
    T = private.shape[0] + 1
    M1, c = buf.shape
    N, d1 = bary.shape
    for t in prange(T):
        p = buf if t == 0 else private[t - 1]
        p[:] = 0
        for n in range(t * N // T, (t + 1) * N // T):
            s = pre[n]
            for r in range(d1):
                w = bary[n, r] * s
                row = offsets[n * d1 + r] + 1
                for k in range(c):
                    p[row, k] += w * values[n, k]
    for v in prange(1, M1):
        for t in range(T - 1):
            for k in range(c):
                buf[v, k] += private[t, v, k]


def _blur_direction(buf, out, neighbours, j):
    c = buf.shape[1]
    for v in prange(buf.shape[0] - 1):
        a, b = neighbours[j, v, 0], neighbours[j, v, 1]
        for k in range(c):
            out[v + 1, k] = buf[v + 1, k] + np.float32(0.5) * (buf[a, k] + buf[b, k])


def _slice(buf, bary, offsets, post, accumulate, out):
    # out[n] (+)= post[n] · Σ_r bary[n, r] · buf[vertex(n, r)]   (post includes α)
    N, d1 = bary.shape
    c = buf.shape[1]
    for n in prange(N):
        if not accumulate:
            for k in range(c):
                out[n, k] = 0
        for r in range(d1):
            w = bary[n, r] * post[n]
            row = offsets[n * d1 + r] + 1
            for k in range(c):
                out[n, k] += w * buf[row, k]


_round_half_even = njit(inline="always", cache=True)(_round_half_even)
_hash = njit(inline="always", cache=True)(_hash)
_lookup = njit(cache=True)(_lookup)
_simplices_cpu = parallel_njit(_simplices)
_grow = njit(cache=True)(_grow)
_insert_all_cpu = njit(cache=True)(_insert_all)
_blur_neighbours_cpu = parallel_njit(_blur_neighbours)
_group_by_vertex_cpu = njit(cache=True)(_group_by_vertex)
_splat_gather_cpu = parallel_njit(_splat_gather)
_splat_scatter_cpu = parallel_njit(_splat_scatter)
_blur_direction_cpu = parallel_njit(_blur_direction)
_slice_cpu = parallel_njit(_slice)


class LatticeCPU:
    """The lattice for one set of features, built once, then used for any number of filters."""

    def __init__(self, features):
        features = np.ascontiguousarray(features, dtype=np.float32)  # (N, d)
        N, d = features.shape
        self.N, self.d = N, d
        keys = np.empty((N, d + 1, d), dtype=np.int32)
        self.bary = np.empty((N, d + 1), dtype=np.float32)
        _simplices_cpu(features, elevation_scale(d), canonical_simplex(d), keys, self.bary)
        K = N * (d + 1)
        table = np.full(1 << max(4, int(np.ceil(np.log2(N)))), EMPTY, dtype=np.int32)
        vertex_keys = np.empty((K, d), dtype=np.int32)
        self.offsets = np.empty(K, dtype=np.int32)
        M, table = _insert_all_cpu(keys.reshape(K, d), table, vertex_keys, self.offsets)
        self.M = M
        self.vertex_keys = vertex_keys[:M]
        self.neighbours = np.empty((d + 1, M, 2), dtype=np.int32)
        _blur_neighbours_cpu(table, vertex_keys, M, self.neighbours)
        self.starts = np.zeros(M + 2, dtype=np.int64)
        self.members = np.empty(K, dtype=np.int64)
        _group_by_vertex_cpu(self.offsets, M, self.starts, self.members)
        self.starts = self.starts[: M + 1]
        self.alpha = np.float32(1.0 / (1.0 + 2.0 ** (-d)))
        self._work = {}
        self._lock = threading.Lock()

    def filter(self, values, reverse=False, pre=None, post=None, out=None):
        """values (N, c) float32 -> (N, c) float32: splat, blur along d+1 directions, slice.

        Optional per-point factors: ``pre`` (N,) scales the values before splatting, ``post``
        (N,) the result; with ``out`` given the result is *added* to it (the CRF's fused
        message passing: one pass over the pixels instead of four).  float64 values are
        filtered in float64 (the same linear operator, for gradient checks).
        """
        dt = np.float64 if values.dtype == np.float64 else np.float32
        values = np.ascontiguousarray(values, dtype=dt)
        ones = None if pre is not None and post is not None else np.ones(self.N, dt)
        pre = ones if pre is None else np.ascontiguousarray(pre, dtype=dt)
        post = ((ones if post is None else post) * self.alpha).astype(dt)
        accumulate = out is not None
        if out is None:
            out = np.empty(values.shape, dtype=dt)
        with self._lock:
            buf, tmp, private = self._work_buffers(values.shape[1], dt)
            if private is not None:
                _splat_scatter_cpu(values, pre, self.bary, self.offsets, private, buf)
            else:
                _splat_gather_cpu(values, pre, self.bary, self.starts, self.members, buf)
            directions = range(self.d, -1, -1) if reverse else range(self.d + 1)
            for j in directions:
                _blur_direction_cpu(buf, tmp, self.neighbours, j)
                buf, tmp = tmp, buf
            _slice_cpu(buf, self.bary, self.offsets, post, accumulate, out)
        return out

    def _work_buffers(self, c, dt):
        """The vertex buffers for c channels of dtype dt, allocated on first use and kept: the
        CRF filters with the same lattice every iteration, and fresh tens of megabytes each
        time cost more in page faults than the blur itself.  (So filter one lattice from one
        thread at a time — ``_lock`` sees to that.)"""
        key = (c, np.dtype(dt).str)
        if key not in self._work:
            buf = np.empty((self.M + 1, c), dtype=dt)
            tmp = np.empty_like(buf)
            buf[0] = 0  # row 0: the "missing neighbour" zero row
            tmp[0] = 0
            # scatter into per-thread copies when the copies are small next to the points' work
            T = numba.get_num_threads()
            copies_bytes = T * self.M * c * np.dtype(dt).itemsize
            private = None
            if T * self.M < 0.25 * self.N * (self.d + 1) and copies_bytes <= 256 << 20:
                private = np.empty((T - 1, self.M + 1, c), dtype=dt)  # thread 0 uses buf
            self._work[key] = (buf, tmp, private)
        return self._work[key]
