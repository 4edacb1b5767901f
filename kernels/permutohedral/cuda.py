"""The permutohedral lattice in CUDA (numba.cuda); the math is in the package docstring.

The lattice is built on the device.  Steps 1-3 (elevate, enclosing simplex, barycentric
weights) run one thread per point, the float32 arithmetic of the CPU kernel (on a real GPU the
compiler fuses multiply-adds, so the weights can differ from the CPU's in their last bits).
Instead of a hash table, the N·(d+1) vertex keys are deduplicated by a stable sort in
lexicographic order (``_packed_keys``): equal keys become neighbours, a vertex is a run of
equal keys, and — because the sort is stable — each vertex's points stay in point order, as
on the CPU.  Blur neighbours are found by binary search in the sorted keys.

Every kernel gathers (one thread per output element), so none needs atomics; splatting cuts
each vertex's list of members into chunks (``SPLAT_CHUNK``), and the blur runs all its d+1
passes in one launch where the GPU allows (``_blur_all``).  Launching a kernel from Python
costs more than most of these kernels take on the GPU, so the lattice keeps its buffers and
its arrays' Numba views from call to call, and the dense CRF's whole mean-field inference runs
as one launch (``MeanFieldCUDA``, at the end).  The same kernels take NumPy arrays under Numba's
CUDA simulator.
"""
import math
import threading
import warnings

import numba
import numpy as np
from tinydeeplab.backend import array_module, cuda_simulator, is_cupy_array

from .._common import THREADS, launch
from .._cuda import cuda
from ..softmax import softmax_rows
from .reference import canonical_simplex, elevation_scale

D_MAX = 16  # local arrays need a compile-time size: features of up to 15 dimensions
D_MAX_2 = D_MAX + 1  # (an expression inside the kernel would not be a compile-time constant)
INT32_MAX, INT32_MIN = np.int32(2**31 - 1), np.int32(-2**31)
# Splatting gathers each vertex's members.  Their number varies wildly (a few for most vertices;
# tens of thousands where wide kernels meet flat image regions), and one thread summing a long
# list alone would hold up the whole launch: so the lists are cut into chunks of at most
# SPLAT_CHUNK members, summed in parallel, and the chunks' sums then added in order.
SPLAT_CHUNK = 32


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
    b = cuda.local.array(D_MAX_2, numba.float32)
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
def _splat_chunk_kernel(values, pre, bary, members, chunk_begin, chunk_vertex, chunk_first,
                        partial, buf):
    # One thread per (chunk, channel): the sum over one chunk of at most SPLAT_CHUNK of a
    # vertex's members (in point order).  A vertex of a single chunk (most of them) is done:
    # its sum goes straight into the buffer; the others' partial sums wait for
    # _splat_sum_kernel.
    t = cuda.grid(1)
    n_chunks, c = chunk_begin.shape[0] - 1, values.shape[1]
    if t >= n_chunks * c:
        return
    ch, k = t // c, t % c
    v = chunk_vertex[ch]
    d1 = bary.shape[1]
    acc = buf[0, k]  # row 0 is the zero row: a zero of the buffer's type
    for m in range(chunk_begin[ch], chunk_begin[ch + 1]):
        e = members[m]
        n, r = e // d1, e % d1
        acc += bary[n, r] * pre[n] * values[n, k]
    if chunk_first[v + 1] - chunk_first[v] == 1:
        buf[v + 1, k] = acc
    else:
        partial[ch, k] = acc


@cuda.jit
def _splat_sum_kernel(partial, chunk_first, multi, buf):
    # one thread per (vertex of several chunks, channel): its chunks' partial sums, in order
    t = cuda.grid(1)
    c = buf.shape[1]
    if t >= multi.shape[0] * c:
        return
    v, k = multi[t // c], t % c
    acc = buf[0, k]
    for ch in range(chunk_first[v], chunk_first[v + 1]):
        acc += partial[ch, k]
    buf[v + 1, k] = acc


@cuda.jit(device=True, inline=True)
def _blur_element(src, dst, neighbours, j, t, c):
    # element t = (vertex v, channel k) of one pass along direction j: 1-2-1 with v's two
    # neighbours (row 0, the zero row, where a neighbour is missing)
    v, k = t // c, t % c
    a, b = neighbours[j, v, 0], neighbours[j, v, 1]
    dst[v + 1, k] = src[v + 1, k] + numba.float32(0.5) * (src[a, k] + src[b, k])


@cuda.jit
def _blur_kernel(buf, out, neighbours, j):
    t = cuda.grid(1)
    M, c = buf.shape[0] - 1, buf.shape[1]
    if t < M * c:
        _blur_element(buf, out, neighbours, j, t, c)


@cuda.jit
def _blur_all_kernel(buf, tmp, neighbours, reverse):
    # All d+1 directions in one launch (a launch costs the host more than a direction costs
    # the GPU): every thread walks the elements with the grid's stride, and the whole grid
    # waits at a barrier between directions.  The passes alternate buf → tmp → buf ...
    grid = cuda.cg.this_grid()
    start, stride = cuda.grid(1), cuda.gridsize(1)
    M, c = buf.shape[0] - 1, buf.shape[1]
    d1 = neighbours.shape[0]
    src, dst = buf, tmp
    for step in range(d1):
        j = d1 - 1 - step if reverse else step
        for t in range(start, M * c, stride):
            _blur_element(src, dst, neighbours, j, t, c)
        grid.sync()
        src, dst = dst, src


# (kernel, dtype name, GPU) -> how many blocks a kernel with a grid-wide barrier may
# launch there (all must be resident at once for the barrier: the occupancy API says how many),
# or 0 where it cannot run (a cooperative launch needs the CUDA toolkit's cudadevrt library)
_COOPERATIVE_BLOCKS = {}


def _cooperative_blocks(kernel, args, dtype):
    """How many blocks of THREADS ``kernel`` (which waits at grid-wide barriers) may launch
    with arguments of these types (``args``: a function that makes them — called only the
    first time); 0 (after a warning, once) where it cannot."""
    if cuda_simulator():
        key = (kernel, np.dtype(dtype).name, -1)
        _COOPERATIVE_BLOCKS.setdefault(key, 1)  # the simulator's grid barrier takes one block
    else:
        import cupy

        key = (kernel, np.dtype(dtype).name, cupy.cuda.runtime.getDevice())
    if key not in _COOPERATIVE_BLOCKS:
        try:
            compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args()))
            _COOPERATIVE_BLOCKS[key] = compiled.max_cooperative_grid_blocks(THREADS)
        except Exception as error:  # noqa: BLE001  (any reason: the fallbacks are exact)
            warnings.warn(f"{kernel.py_func.__name__} cannot run: a grid-wide barrier is not "
                          f"available here ({type(error).__name__}: {error}); the lattice "
                          f"falls back to one launch per step", RuntimeWarning, stacklevel=4)
            _COOPERATIVE_BLOCKS[key] = 0
    return _COOPERATIVE_BLOCKS[key]


def _blur_all(buf, tmp, neighbours, reverse, count):
    """The whole blur in one launch when possible; False when it has to go direction by
    direction."""
    args = (buf, tmp, neighbours, reverse)
    cap = _cooperative_blocks(_blur_all_kernel, lambda: args, buf.dtype)
    if cap == 0:
        return False
    _blur_all_kernel[min(cap, math.ceil(count / THREADS)), THREADS](*args)
    return True


@cuda.jit
def _slice_kernel(buf, bary, offsets, post, alpha, base, mode, out):
    # out[n, k] = (0 | out[n, k] | base[n, k]) + post[n] · α · Σ_r bary[n, r] · buf[vertex, k]
    # for mode 0 | 1 | 2 (as the CPU's _slice: from zero, accumulate, from base)
    t = cuda.grid(1)
    N, c = out.shape
    if t >= N * c:
        return
    n, k = t // c, t % c
    d1 = bary.shape[1]
    p = post[n] * alpha
    acc = buf[0, k]  # zero, in the buffer's type
    for r in range(d1):
        acc += bary[n, r] * p * buf[offsets[n * d1 + r] + 1, k]
    if mode == 1:
        out[n, k] += acc
    elif mode == 2:
        out[n, k] = base[n, k] + acc
    else:
        out[n, k] = acc


@cuda.jit
def _key_bounds_kernel(keys, bounds):
    # bounds (2, d), set to (+2^31 − 1, −2^31) beforehand: each column's smallest and largest
    # key.  Each thread scans its rows (grid stride), the block merges its threads' bounds in
    # shared memory, and one thread per column updates ``bounds`` atomically: a few global
    # atomics per block instead of one per key.
    K, d = keys.shape
    t = cuda.threadIdx.x
    block = cuda.shared.array((2, D_MAX), numba.int32)
    lo = cuda.local.array(D_MAX, numba.int32)
    hi = cuda.local.array(D_MAX, numba.int32)
    for i in range(d):
        lo[i], hi[i] = INT32_MAX, INT32_MIN
        if t == 0:
            block[0, i], block[1, i] = INT32_MAX, INT32_MIN
    cuda.syncthreads()
    for r in range(cuda.grid(1), K, cuda.gridsize(1)):
        for i in range(d):
            lo[i] = min(lo[i], keys[r, i])
            hi[i] = max(hi[i], keys[r, i])
    for i in range(d):
        cuda.atomic.min(block, (0, i), lo[i])
        cuda.atomic.max(block, (1, i), hi[i])
    cuda.syncthreads()
    if t < d:
        cuda.atomic.min(bounds, (0, t), block[0, t])
        cuda.atomic.max(bounds, (1, t), block[1, t])


def _key_bounds(keys):
    """([min of each column], [max of each column]) of an (K, d) int32 key array, as Python
    ints.  CuPy's ``keys.min(axis=0)`` reduces a non-contiguous axis with one block per
    column, many times slower than one pass over the rows here."""
    xp = array_module(keys)
    K, d = keys.shape
    bounds = xp.empty((2, d), dtype=xp.int32)
    bounds[0], bounds[1] = INT32_MAX, INT32_MIN
    blocks = max(1, min(1024, math.ceil(K / (THREADS * 8))))  # ≥ 8 rows a thread
    _key_bounds_kernel[blocks, THREADS](keys, bounds)
    return bounds.tolist()


def _packed_keys(keys):
    """The rows of an integer key array as single int64 numbers in the same lexicographic
    order — (keys[:, 0] − min) · span_1 · span_2 ⋯ + … — when their ranges allow it (the
    spans multiply to under 2^62: true of image features unless sxy or srgb is tiny), else
    None."""
    xp = array_module(keys)
    lo, hi = _key_bounds(keys)
    spans = [h - l + 1 for l, h in zip(lo, hi)]
    if math.prod(spans) >= 2**62:
        return None
    packed = keys[:, 0].astype(xp.int64) - lo[0]
    for i in range(1, keys.shape[1]):
        packed *= spans[i]
        packed += keys[:, i]  # into the int64 sum first: keys[:, i] − lo[i] may pass 2^31
        packed -= lo[i]
    return packed


_TABLES = {}  # (d, GPU) -> the elevation scale and canonical simplex of that dimension


def _constant_tables(d, xp):
    """The build's two small tables for dimension d, copied to the device once (a copy from
    the host waits for the GPU)."""
    key = (d, -1 if xp is np else xp.cuda.runtime.getDevice())
    if key not in _TABLES:
        _TABLES[key] = (_view(xp.asarray(elevation_scale(d))),
                        _view(xp.asarray(canonical_simplex(d))))
    return _TABLES[key]


def _view(a):
    """A CuPy array as a Numba device array (same memory): Numba launches a kernel faster with
    its own arrays than with objects it must read ``__cuda_array_interface__`` from each time.
    NumPy arrays (the simulator) pass through."""
    return cuda.as_cuda_array(a) if is_cupy_array(a) else a


class LatticeCUDA:
    """Same interface as ``cpu_fast.LatticeCPU``, on CuPy arrays (NumPy under the
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
        launch(_simplices_kernel, N, features, *_constant_tables(d, xp), keys, self.bary)
        # dedupe by a stable sort, in lexicographic key order
        packed = _packed_keys(keys)
        new_vertex = xp.ones(K, dtype=bool)
        if packed is not None:  # one 64-bit sort key per row: a sort several times faster
            order = xp.argsort(packed, kind="stable")
            sorted_packed = packed[order]
            new_vertex[1:] = sorted_packed[1:] != sorted_packed[:-1]
            sorted_keys = keys[order]
        else:  # lexsort's last key is the primary one
            order = xp.lexsort(keys.T[::-1])
            sorted_keys = keys[order]
            new_vertex[1:] = (sorted_keys[1:] != sorted_keys[:-1]).any(axis=1)
        vertex_of_sorted = xp.cumsum(new_vertex, dtype=xp.int64) - 1
        self.offsets = xp.empty(K, dtype=xp.int32)
        self.offsets[order] = vertex_of_sorted.astype(xp.int32)
        first = xp.nonzero(new_vertex)[0]
        self.M = M = int(first.shape[0])
        self.vertex_keys = xp.ascontiguousarray(sorted_keys[first])
        starts = xp.concatenate([first, xp.asarray([K])]).astype(xp.int64)
        self.members = order.astype(xp.int64)
        # the members of vertex v, starts[v]..starts[v+1], cut into chunks of SPLAT_CHUNK:
        # chunk_first[v] is v's first chunk, chunk_begin[ch] a chunk's first member; a chunk
        # ends where the next begins (chunk_begin[n_chunks] = K)
        counts = starts[1:] - starts[:-1]
        per_vertex = (counts + SPLAT_CHUNK - 1) // SPLAT_CHUNK
        self.chunk_first = xp.concatenate([xp.zeros(1, xp.int64), xp.cumsum(per_vertex)])
        n_chunks = int(self.chunk_first[-1])
        chunk = xp.arange(n_chunks, dtype=xp.int64)
        self.chunk_vertex = xp.searchsorted(self.chunk_first, chunk, side="right") - 1
        self.chunk_begin = xp.concatenate([
            starts[self.chunk_vertex] +
            (chunk - self.chunk_first[self.chunk_vertex]) * SPLAT_CHUNK,
            xp.asarray([K], dtype=xp.int64)])
        self.multi = xp.nonzero(per_vertex > 1)[0].astype(xp.int64)  # vertices of > 1 chunk
        self.neighbours = xp.empty((d + 1, M, 2), dtype=xp.int32)
        launch(_neighbours_kernel, (d + 1) * M, self.vertex_keys, self.neighbours)
        self.alpha = np.float32(1.0 / (1.0 + 2.0 ** (-d)))
        self.lock = threading.RLock()  # held from splat to slice (LatticeCPU.filter)
        # the arrays every splat, blur and slice reads, as Numba device arrays (see _view)
        self._k = {name: _view(getattr(self, name))
                   for name in ("bary", "offsets", "members", "neighbours", "chunk_begin",
                                "chunk_vertex", "chunk_first", "multi")}
        self._views = {}  # id -> (CuPy array, its view): the arrays passed again and again
        self._ones = {}  # dtype name -> ones(N): the per-point factor when none is given
        # (c, dtype name) -> [two (M + 1, c) vertex buffers (row 0 zero), the (chunks, c)
        # partial sums of long vertices], made on the first splat of that shape
        self._work = {}
        self._buf = None  # the vertex buffer of the last splat

    def _view(self, a):
        """``_view(a)``, remembered for the last few arrays: the mean-field loop passes the
        same Q, unary and normalisation arrays every iteration, and making a view costs about
        as much as a launch.  The entries hold their arrays, so an id is never reused while
        remembered."""
        if not is_cupy_array(a):
            return a
        hit = self._views.get(id(a))
        if hit is None or hit[0] is not a:
            if len(self._views) >= 6:
                self._views.clear()
            hit = self._views[id(a)] = (a, _view(a))
        return hit[1]

    def _factor(self, a, dt):
        if a is None:
            if dt.name not in self._ones:
                self._ones[dt.name] = _view(self.xp.ones(self.N, dt))
            return self._ones[dt.name]
        return self._view(self.xp.ascontiguousarray(a, dtype=dt))

    def filter(self, values, reverse=False, pre=None, post=None, out=None, base=None):
        with self.lock:
            self.splat(values, pre)
            return self.slice(self.blur(reverse), post, out, base)

    def splat(self, values, pre=None):
        """values (N, c) times ``pre`` (N,) into the vertex buffer; row 0 of the buffers stays
        zero (it stands for a missing neighbour, and every kernel writes only rows 1..M), so
        they are zeroed once, when first made."""
        xp = self.xp
        dt = np.dtype(np.float64 if values.dtype == xp.float64 else np.float32)
        values = xp.ascontiguousarray(values, dtype=dt)
        c = values.shape[1]
        if (c, dt.name) not in self._work:
            self._work[(c, dt.name)] = [_view(xp.zeros((self.M + 1, c), dtype=dt)),
                                        _view(xp.zeros((self.M + 1, c), dtype=dt)),
                                        _view(xp.empty((self.chunk_vertex.shape[0], c), dt))]
        self._buf, _, partial = self._work[(c, dt.name)]
        buf, k = self._buf, self._k
        launch(_splat_chunk_kernel, self.chunk_vertex.shape[0] * c, self._view(values),
               self._factor(pre, dt), k["bary"], k["members"], k["chunk_begin"],
               k["chunk_vertex"], k["chunk_first"], partial, buf)
        launch(_splat_sum_kernel, self.multi.shape[0] * c, partial, k["chunk_first"],
               k["multi"], buf)

    def blur(self, reverse=False, one_launch=True):
        """The splatted buffer blurred along every lattice direction; the result is one of
        this lattice's two buffers (valid until its next splat).  ``one_launch``: all passes
        in one launch with grid-wide barriers where the GPU allows (else one per direction)."""
        if self._buf is None:
            raise RuntimeError("blur needs a splat first (LatticeCUDA.splat)")
        buf = self._buf
        c = buf.shape[1]
        tmp = self._work[(c, np.dtype(buf.dtype).name)][1]  # (the splat fills the first)
        if one_launch and _blur_all(buf, tmp, self._k["neighbours"], bool(reverse),
                                    self.M * c):
            return buf if (self.d + 1) % 2 == 0 else tmp  # where the last pass wrote
        for j in (range(self.d, -1, -1) if reverse else range(self.d + 1)):
            launch(_blur_kernel, self.M * c, buf, tmp, self._k["neighbours"], j)
            buf, tmp = tmp, buf
        return buf

    def slice(self, blurred, post=None, out=None, base=None, softmax=False):
        """Interpolate the blurred buffer back to the points, times post·α: into a new array,
        or added to ``out`` (to ``base`` first, when given)."""
        xp = self.xp
        dt = np.dtype(blurred.dtype)
        c = blurred.shape[1]
        mode = 0 if out is None else 1 if base is None or base is out else 2
        if out is None:
            out = xp.empty((self.N, c), dtype=dt)
        view = self._view(out)
        launch(_slice_kernel, self.N * c, blurred, self._k["bary"], self._k["offsets"],
               self._factor(post, dt), self.alpha.astype(dt), view if mode != 2 else
               self._view(base), mode, view)
        if softmax:
            softmax_rows(view, view, cuda=True)
        return out
