"""The permutohedral lattice on the CPU, plainly parallel: one Numba loop per step.

The reference's algorithm (``reference``), with each per-point or per-vertex step as one
``prange`` loop over points or vertices, written one element at a time — no intrinsics, no
blocking, no rings.  Splat is a gather (each vertex sums its own points, in point order), so no
two threads write the same row.  The vertices are numbered and their blur neighbours found with
the reference's NumPy functions (sorting; ``cpu_fast_build`` does it faster with hash tables).
Every sum is in the reference's order, so the results are the reference's bit for bit.
"""
import numpy as np
from numba import prange

from .. import parallel_njit
from .reference import blur_neighbours, canonical_simplex, elevation_scale, number_vertices


def _simplices(features, scale, canonical, keys, bary):
    # steps 1-3 for each point n: keys (N, d+1, d) of its corners, bary (N, d+1)
    N, d = features.shape
    f32 = np.float32
    down, up = f32(1.0) / f32(d + 1), f32(d + 1)
    for n in prange(N):
        elevated = np.empty(d + 1, np.float32)  # 1. elevate
        running = f32(0.0)
        for j in range(d, 0, -1):
            scaled = features[n, j - 1] * scale[j - 1]
            elevated[j] = running - f32(j) * scaled
            running += scaled
        elevated[0] = running
        rem0 = np.empty(d + 1, np.float32)  # 2. the remainder-0 vertex and the ranks
        diff = np.empty(d + 1, np.float32)
        total = 0
        for i in range(d + 1):
            r = np.rint(np.float64(down * elevated[i]))  # ties to even
            rem0[i] = f32(r) * up
            diff[i] = elevated[i] - rem0[i]
            total += np.int64(r)
        rank = np.empty(d + 1, np.int64)
        for i in range(d + 1):
            rank[i] = total
            for j in range(d + 1):
                if (j < i and diff[j] >= diff[i]) or (j > i and diff[j] > diff[i]):
                    rank[i] += 1
        for i in range(d + 1):  # back onto the plane Σx = 0
            move = np.int64(rank[i] < 0) - np.int64(rank[i] > d)
            rank[i] += (d + 1) * move
            rem0[i] += up * f32(move)
        b = np.zeros(d + 2, np.float32)  # 3. barycentric weights
        for i in range(d + 1):
            v = (elevated[i] - rem0[i]) * down
            b[d - rank[i]] += v
            b[d - rank[i] + 1] -= v
        b[0] += f32(1.0) + b[d + 1]
        for k in range(d + 1):
            bary[n, k] = b[k]
            for i in range(d):  # corner k: rem0 + the canonical offset of each rank
                keys[n, k, i] = np.int64(rem0[i]) + canonical[k, rank[i]]


def _splat(values, pre, bary, starts, members, buf):
    # step 4, a gather: vertex v sums weight · pre · value over its corners
    # members[starts[v]:starts[v+1]] (corner e = point n·(d+1) + k), in point order
    d1 = bary.shape[1]
    for v in prange(buf.shape[0]):
        for k in range(buf.shape[1]):
            buf[v, k] = 0
        for m in range(starts[v], starts[v + 1]):
            n, r = members[m] // d1, members[m] % d1
            w = values.dtype.type(bary[n, r]) * pre[n]
            for k in range(buf.shape[1]):
                buf[v, k] += w * values[n, k]


def _blur(src, dst, neighbours):
    # step 5 along one direction: dst[v] = src[v] + ½ (src[ahead] + src[behind]), none: 0
    half = src.dtype.type(0.5)
    for v in prange(src.shape[0]):
        a, b = neighbours[v, 0], neighbours[v, 1]
        for k in range(src.shape[1]):
            left = src[a, k] if a >= 0 else src.dtype.type(0)
            right = src[b, k] if b >= 0 else src.dtype.type(0)
            dst[v, k] = src[v, k] + half * (left + right)


def _slice(buf, bary, offsets, post, alpha, out):
    # step 6: out[n] += Σ_k bary[n, k] · post[n] · α · buf[corner k], corner by corner
    d1 = bary.shape[1]
    for n in prange(bary.shape[0]):
        p = post[n] * alpha
        for r in range(d1):
            w = out.dtype.type(bary[n, r]) * p
            v = offsets[n * d1 + r]
            for k in range(out.shape[1]):
                out[n, k] += w * buf[v, k]


_simplices_cpu = parallel_njit(_simplices)
_splat_cpu = parallel_njit(_splat)
_blur_cpu = parallel_njit(_blur)
_slice_cpu = parallel_njit(_slice)


def per_point(factor, N, dt):
    """A per-point factor (pre, post) as a contiguous (N,) array of dtype dt; None: ones."""
    return np.ones(N, dt) if factor is None else np.ascontiguousarray(factor, dtype=dt)


def values_dtype(values):
    """The dtype a filter computes in: float64 for float64 values, else float32."""
    return np.float64 if np.asarray(values).dtype == np.float64 else np.float32


class LatticeCPUPlain:
    """Same interface as ``reference.LatticeReference``, its steps as parallel Numba loops."""

    def __init__(self, features):
        features = np.ascontiguousarray(features, dtype=np.float32)
        self.N, self.d = N, d = features.shape
        keys = np.empty((N, d + 1, d), dtype=np.int64)
        self.bary = np.empty((N, d + 1), dtype=np.float32)
        _simplices_cpu(features, elevation_scale(d), canonical_simplex(d).astype(np.int64),
                       keys, self.bary)
        self.vertex_keys, self.offsets = number_vertices(keys.reshape(-1, d))
        self.M = len(self.vertex_keys)
        self.neighbours = blur_neighbours(self.vertex_keys)
        self.alpha = np.float32(1.0 / (1.0 + 2.0 ** (-d)))
        # the corners of each vertex, in point order, for the gather splat
        self.members = np.argsort(self.offsets, kind="stable")
        self.starts = np.searchsorted(self.offsets[self.members], np.arange(self.M + 1))

    def splat(self, values, pre=None):
        dt = values_dtype(values)
        values = np.ascontiguousarray(values, dtype=dt)
        buf = np.empty((self.M, values.shape[1]), dtype=dt)
        _splat_cpu(values, per_point(pre, self.N, dt), self.bary, self.starts, self.members,
                   buf)
        return buf

    def blur(self, buf, reverse=False):
        other = np.empty_like(buf)
        for j in (range(self.d, -1, -1) if reverse else range(self.d + 1)):
            _blur_cpu(buf, other, self.neighbours[j])
            buf, other = other, buf
        return buf

    def slice_(self, buf, post=None, out=None, base=None):
        dt = buf.dtype.type
        start = base if base is not None else out
        result = np.zeros((self.N, buf.shape[1]), dt) if start is None else \
            np.array(start, dtype=dt, order="C")
        _slice_cpu(buf, self.bary, self.offsets, per_point(post, self.N, dt), dt(self.alpha),
                   result)
        if out is not None:
            out[...] = result
            return out
        return result

    def filter(self, values, reverse=False, pre=None, post=None, out=None, base=None):
        return self.slice_(self.blur(self.splat(values, pre), reverse), post, out, base)
