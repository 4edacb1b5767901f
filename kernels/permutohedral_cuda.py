"""CUDA (numba.cuda) version of the permutohedral lattice; the math is in ``permutohedral``.

The lattice is built on the device.  Steps 1-3 (elevate, enclosing simplex, barycentric
weights) run one thread per point, exactly the float32 arithmetic of the CPU kernel.  Instead of
a hash table, the N·(d+1) vertex keys are deduplicated by a stable lexicographic *sort*
(``xp.lexsort``): equal keys become neighbours, a vertex is a run of equal keys, and — because
the sort is stable — each vertex's points stay in point order, so splatting adds them in the
same order as the CPU does.  Blur neighbours are found by binary search in the sorted keys.

Every kernel gathers (one thread per output element), so none needs atomics.  The same kernels
take NumPy arrays under Numba's CUDA simulator.
"""
import math
import threading

import numba
import numpy as np
from numba import cuda

from tinydeeplab.backend import array_module

from ._common import launch

from .permutohedral import canonical_simplex, elevation_scale
from .softmax import softmax_rows

D_MAX = 16  # local arrays need a compile-time size: features of up to 15 dimensions


@cuda.jit
def _simplices_kernel(features, scale, canonical, keys, bary):
    n = cuda.grid(1)
    N, d = features.shape
    if n >= N:
        return
    f32 = numba.float32
    elevated = cuda.local.array(D_MAX, numba.float32)
    rem0 = cuda.local.array(D_MAX, numba.float32)
    rank = cuda.local.array(D_MAX, numba.int32)
    b = cuda.local.array(D_MAX + 1, numba.float32)
    down, up = f32(1.0) / f32(d + 1), f32(d + 1)
    sm = f32(0.0)
    for j in range(d, 0, -1):
        cf = features[n, j - 1] * scale[j - 1]
        elevated[j] = sm - f32(j) * cf
        sm += cf
    elevated[0] = sm
    total = 0
    for i in range(d + 1):
        x = down * elevated[i]
        r = math.floor(x + 0.5)  # ties to even, as the CPU kernel
        if r - x == 0.5 and r % 2 != 0:
            r -= 1
        rd = int(r)
        rem0[i] = f32(rd) * up
        total += rd
        rank[i] = 0
        b[i] = 0
    b[d + 1] = 0
    for i in range(d):
        di = elevated[i] - rem0[i]
        for j in range(i + 1, d + 1):
            if di < elevated[j] - rem0[j]:
                rank[i] += 1
            else:
                rank[j] += 1
    for i in range(d + 1):
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
    b[0] += f32(1.0) + b[d + 1]
    for k in range(d + 1):
        for i in range(d):
            keys[n * (d + 1) + k, i] = int(rem0[i]) + canonical[k, rank[i]]
        bary[n, k] = b[k]


@cuda.jit(device=True)
def _compare(keys, row, probe):
    """-1, 0, 1 as keys[row] is lexicographically below, equal to, above probe."""
    for i in range(keys.shape[1]):
        if keys[row, i] < probe[i]:
            return -1
        if keys[row, i] > probe[i]:
            return 1
    return 0


@cuda.jit(device=True)
def _find(keys, probe):
    lo, hi = 0, keys.shape[0] - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        c = _compare(keys, mid, probe)
        if c == 0:
            return mid
        if c < 0:
            lo = mid + 1
        else:
            hi = mid - 1
    return -1


@cuda.jit
def _neighbours_kernel(vertex_keys, neighbours):
    # one thread per (direction j, vertex v): a binary search of the sorted keys for each
    # neighbour (the CPU lattice merges the sorted keys with themselves instead)
    t = cuda.grid(1)
    M, d = vertex_keys.shape
    if t >= (d + 1) * M:
        return
    j, v = t // M, t % M
    probe = cuda.local.array(D_MAX, numba.int32)
    for side in range(2):
        step = -1 if side == 0 else 1
        for i in range(d):
            probe[i] = vertex_keys[v, i] + step
        if j < d:
            probe[j] = vertex_keys[v, j] - step * d
        neighbours[j, v, side] = _find(vertex_keys, probe) + 1


@cuda.jit
def _splat_kernel(values, pre, bary, starts, members, buf):
    t = cuda.grid(1)
    M, c = buf.shape[0] - 1, values.shape[1]
    if t >= M * c:
        return
    v, k = t // c, t % c
    d1 = bary.shape[1]
    acc = buf[0, k]  # row 0 is the zero row: a zero of the buffer's type
    for m in range(starts[v], starts[v + 1]):
        e = members[m]
        n, r = e // d1, e % d1
        acc += bary[n, r] * pre[n] * values[n, k]
    buf[v + 1, k] = acc


@cuda.jit
def _blur_kernel(buf, out, neighbours, j):
    t = cuda.grid(1)
    M, c = buf.shape[0] - 1, buf.shape[1]
    if t >= M * c:
        return
    v, k = t // c, t % c
    a, b = neighbours[j, v, 0], neighbours[j, v, 1]
    out[v + 1, k] = buf[v + 1, k] + numba.float32(0.5) * (buf[a, k] + buf[b, k])


@cuda.jit
def _slice_kernel(buf, bary, offsets, post, accumulate, out):
    t = cuda.grid(1)
    N, c = out.shape
    if t >= N * c:
        return
    n, k = t // c, t % c
    d1 = bary.shape[1]
    acc = buf[0, k]  # zero, in the buffer's type
    for r in range(d1):
        acc += bary[n, r] * post[n] * buf[offsets[n * d1 + r] + 1, k]
    if accumulate:
        out[n, k] += acc
    else:
        out[n, k] = acc


class LatticeCUDA:
    """Same interface as ``permutohedral.LatticeCPU``, on CuPy arrays (NumPy under the
    simulator)."""

    def __init__(self, features):
        xp = self.xp = array_module(features)
        features = xp.ascontiguousarray(features, dtype=xp.float32)
        N, d = features.shape
        if d >= D_MAX:
            raise ValueError(f"the CUDA lattice takes features of at most {D_MAX - 1} "
                             f"dimensions, got {d}")
        self.N, self.d = N, d
        K = N * (d + 1)
        keys = xp.empty((K, d), dtype=xp.int32)
        self.bary = xp.empty((N, d + 1), dtype=xp.float32)
        launch(_simplices_kernel, N, features, xp.asarray(elevation_scale(d)),
                xp.asarray(canonical_simplex(d)), keys, self.bary)
        # dedupe by a stable sort: lexsort's last key is the primary one
        order = xp.lexsort(keys.T[::-1])
        sorted_keys = keys[order]
        new_vertex = xp.ones(K, dtype=bool)
        new_vertex[1:] = (sorted_keys[1:] != sorted_keys[:-1]).any(axis=1)
        vertex_of_sorted = xp.cumsum(new_vertex, dtype=xp.int64) - 1
        self.offsets = xp.empty(K, dtype=xp.int32)
        self.offsets[order] = vertex_of_sorted.astype(xp.int32)
        first = xp.nonzero(new_vertex)[0]
        self.M = M = int(first.shape[0])
        self.vertex_keys = xp.ascontiguousarray(sorted_keys[first])
        self.starts = xp.concatenate([first, xp.asarray([K])]).astype(xp.int64)
        self.members = order.astype(xp.int64)
        self.neighbours = xp.empty((d + 1, M, 2), dtype=xp.int32)
        launch(_neighbours_kernel, (d + 1) * M, self.vertex_keys, self.neighbours)
        self.alpha = np.float32(1.0 / (1.0 + 2.0 ** (-d)))
        self.lock = threading.RLock()  # held from splat to slice (LatticeCPU.filter)
        self._buf = None  # the vertex buffer of the last splat

    def filter(self, values, reverse=False, pre=None, post=None, out=None, base=None):
        with self.lock:
            self.splat(values, pre)
            return self.slice(self.blur(reverse), post, out, base)

    def splat(self, values, pre=None):
        xp = self.xp
        dt = xp.float64 if values.dtype == xp.float64 else xp.float32
        values = xp.ascontiguousarray(values, dtype=dt)
        c = values.shape[1]
        pre = xp.ones(self.N, dt) if pre is None else xp.asarray(pre, dt)
        self._buf = xp.zeros((self.M + 1, c), dtype=dt)
        launch(_splat_kernel, self.M * c, values, pre, self.bary, self.starts, self.members,
               self._buf)

    def blur(self, reverse=False):
        if self._buf is None:
            raise RuntimeError("blur needs a splat first (LatticeCUDA.splat)")
        buf = self._buf
        c = buf.shape[1]
        tmp = self.xp.zeros_like(buf)
        for j in (range(self.d, -1, -1) if reverse else range(self.d + 1)):
            launch(_blur_kernel, self.M * c, buf, tmp, self.neighbours, j)
            buf, tmp = tmp, buf
        return buf

    def slice(self, blurred, post=None, out=None, base=None, softmax=False):
        xp = self.xp
        dt = blurred.dtype
        c = blurred.shape[1]
        post = ((xp.ones(self.N, dt) if post is None else post) * self.alpha).astype(dt)
        accumulate = out is not None
        if out is None:
            out = xp.empty((self.N, c), dtype=dt)
        elif base is not None and base is not out:
            out[...] = base
        launch(_slice_kernel, self.N * c, blurred, self.bary, self.offsets, post, accumulate,
               out)
        if softmax:
            softmax_rows(out, out, cuda=True)
        return out
