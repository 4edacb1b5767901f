"""CUDA (numba.cuda) version of the permutohedral lattice; the math is in ``permutohedral``.

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
from ._cuda import cuda

from tinydeeplab.backend import array_module, cuda_simulator, is_cupy_array

from ._common import THREADS, launch

from .permutohedral import canonical_simplex, elevation_scale
from .softmax import softmax_rows
from .softmax_cuda import softmax_row

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


# (kernel name, dtype name, GPU) -> how many blocks a kernel with a grid-wide barrier may
# launch there (all must be resident at once for the barrier: the occupancy API says how many),
# or 0 where it cannot run (a cooperative launch needs the CUDA toolkit's cudadevrt library)
_COOPERATIVE_BLOCKS = {}
ONE_LAUNCH_BLUR = True  # False: one launch per direction always (the tests compare the two)


def _cooperative_blocks(kernel, args, dtype):
    """How many blocks of THREADS ``kernel`` (which waits at grid-wide barriers) may launch
    with arguments of these types (``args``: a function that makes them — called only the
    first time); 0 (after a warning, once) where it cannot."""
    if cuda_simulator():
        key = (kernel.py_func.__name__, np.dtype(dtype).name, -1)
        _COOPERATIVE_BLOCKS.setdefault(key, 1)  # the simulator's grid barrier takes one block
    else:
        import cupy

        key = (kernel.py_func.__name__, np.dtype(dtype).name, cupy.cuda.runtime.getDevice())
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
    if not ONE_LAUNCH_BLUR:
        return False
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
    column: 3.5 ms for a photo's bilateral keys on an H200, against 0.2 ms here."""
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

    def blur(self, reverse=False):
        """The splatted buffer blurred along every lattice direction; the result is one of
        this lattice's two buffers (valid until its next splat)."""
        if self._buf is None:
            raise RuntimeError("blur needs a splat first (LatticeCUDA.splat)")
        buf = self._buf
        c = buf.shape[1]
        tmp = self._work[(c, np.dtype(buf.dtype).name)][1]  # (the splat fills the first)
        if _blur_all(buf, tmp, self._k["neighbours"], bool(reverse), self.M * c):
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


# ---- mean field in one launch ------------------------------------------------------------------
# A mean-field iteration of the dense CRF is, per kernel, a splat (two launches), a blur (one)
# and a slice (one), then a softmax: nine launches with two kernels, ninety for ten iterations.
# On a GPU each costs the host 30-80 µs of Python (numba-cuda converts every argument on every
# launch), more than the GPU needs for the work itself at photo sizes.  So where every kernel
# has a Potts compatibility (densecrf's default), the whole inference runs in one launch that
# waits at grid-wide barriers between its steps.  The kernels' lattices are laid side by side
# (``MeanFieldCUDA``): one vertex buffer, its rows lattice after lattice, so each step covers
# all kernels at once, and the constant per-point factors are folded into the splat and slice
# weights beforehand — the same products, so the same bits, as step by step.
FUSED_MEAN_FIELD = True  # False: step by step always (the tests compare the two)
# Iterations per launch at most: a launch that runs for seconds (a large image, hundreds of
# iterations) would trip the watchdog of a GPU that also drives a display.  Ten-iteration
# runs take one launch; longer ones continue from Q where the last launch left it.
ITERATIONS_PER_LAUNCH = 25
# Blocks of THREADS that the compiler must let each multiprocessor hold at once.  A cooperative
# launch can have no more blocks than fit on the GPU together, and left to itself the compiler
# gives this kernel 104 registers a thread: 4 blocks per multiprocessor, too few threads in
# flight to hide the memory latency of its scattered reads.  Eight caps it at 64 registers
# (65536 / (8 · 128); ptxas spills a few hundred bytes of array descriptors to the cache).
# On an H200 (benchmarks/RESULTS.md, session 11) that made the iterations 1.03-1.6× faster at
# 500×375 and 1000×750, and 1.05-1.3× faster than step by step at every size tried; 6 and 12
# were slower than step by step somewhere.
MEAN_FIELD_BLOCKS_PER_SM = 8


def _jit_bounded(min_blocks):
    """``cuda.jit`` with launch bounds: THREADS per block, at least ``min_blocks`` of them
    resident per multiprocessor (the simulator's jit takes none; it has no registers)."""
    return cuda.jit if cuda_simulator() else cuda.jit(launch_bounds=(THREADS, min_blocks))


@_jit_bounded(MEAN_FIELD_BLOCKS_PER_SM)
def _mean_field_kernel(unary, first, iterations, last, base, q, out, pt, sw, chunk_begin,
                       chunk_row, partial, multi, neighbours, buf, slice_rows, slice_w,
                       slice_starts):
    # unary (C, N): energies; base (N, C): −unary transposed, made first (so that the slices,
    # a thread per (point, label), read it in order).  q (N, C): the current Q, then the new
    # log-potentials in place.  out (C, N): the final Q.  ``first``: start from Q_0 (else go
    # on from q); ``last``: write out after this launch's ``iterations``.
    # Splat: member m of the concatenated lists adds sw[m]·q[pt[m]] to its chunk; chunk ch's
    # sum goes to buffer row chunk_row[ch], or to partial[ch] when its vertex has several
    # chunks (multi: rows (buffer row, first chunk, end chunk)).  Blur: the buffer's halves
    # [0, R) and [R, 2R) alternate as source and destination; pass j reads neighbours[j]
    # (rows relative to a half, −1: the row takes no part in pass j — the zero row, and
    # lattices of fewer than j + 1 directions).  Slice: point n adds, per kernel k,
    # Σ_s slice_w[n, s] · buf[slice_rows[n, s]] over s in slice_starts[k] .. slice_starts[k+1].
    grid = cuda.cg.this_grid()
    start, stride = cuda.grid(1), cuda.gridsize(1)
    C, N = unary.shape
    n_chunks, n_multi, R = chunk_row.shape[0], multi.shape[0], neighbours.shape[1]
    f32 = numba.float32
    for n in range(start, N if first else 0, stride):  # Q_0 = softmax(−U)
        for k in range(C):
            base[n, k] = -unary[k, n]
            q[n, k] = base[n, k]
        softmax_row(q, q, n)
        if iterations == 0 and last:
            for k in range(C):
                out[k, n] = q[n, k]
    for it in range(iterations):
        grid.sync()
        for t in range(start, n_chunks * C, stride):  # splat, in chunks
            ch, k = t // C, t % C
            acc = f32(0.0)
            for m in range(chunk_begin[ch], chunk_begin[ch + 1]):
                acc += sw[m] * q[pt[m], k]
            if chunk_row[ch] >= 0:
                buf[chunk_row[ch], k] = acc
            else:
                partial[ch, k] = acc
        grid.sync()
        for t in range(start, n_multi * C, stride):  # the chunks' sums of long vertices
            i, k = t // C, t % C
            acc = f32(0.0)
            for ch in range(multi[i, 1], multi[i, 2]):
                acc += partial[ch, k]
            buf[multi[i, 0], k] = acc
        for j in range(neighbours.shape[0]):  # blur: pass j along direction j of each lattice
            grid.sync()
            src, dst = (j % 2) * R, ((j + 1) % 2) * R
            for t in range(start, R * C, stride):
                v, k = t // C, t % C
                a = neighbours[j, v, 0]
                if a >= 0:
                    b = neighbours[j, v, 1]
                    buf[dst + v, k] = buf[src + v, k] + f32(0.5) * (buf[src + a, k] +
                                                                    buf[src + b, k])
        grid.sync()
        for t in range(start, N * C, stride):  # slice: −U plus every kernel's message
            n, k = t // C, t % C
            logit = base[n, k]
            for kernel in range(slice_starts.shape[0] - 1):
                acc = f32(0.0)
                for s in range(slice_starts[kernel], slice_starts[kernel + 1]):
                    acc += slice_w[n, s] * buf[slice_rows[n, s], k]
                logit += acc
            q[n, k] = logit
        grid.sync()
        for n in range(start, N, stride):  # softmax
            softmax_row(q, q, n)
            if last and it == iterations - 1:
                for k in range(C):
                    out[k, n] = q[n, k]


@cuda.jit
def _side_by_side_kernel(members, bary, pre, post, alpha, chunk_begin, chunk_vertex, chunk_first,
                         multi, neighbours, offsets, base, half, member0, chunk0, multi0, col0,
                         pt, sw, all_chunk_begin, chunk_row, all_multi, all_neighbours,
                         slice_rows, slice_w):
    # One lattice's part of MeanFieldCUDA's tables (see _mean_field_kernel): its vertex v is
    # row base + v, its members, chunks and long vertices come after member0, chunk0 and
    # multi0 of the lattices before it, its slice columns after col0; its blur's result lies
    # in the buffer's half starting at row ``half``.  The factors are multiplied in as the
    # step-by-step kernels do (bary·pre; bary·(post·α)), so the products are the same.
    start, stride = cuda.grid(1), cuda.gridsize(1)
    N, d1 = bary.shape
    M = neighbours.shape[1]
    for m in range(start, members.shape[0], stride):
        n, r = members[m] // d1, members[m] % d1
        pt[member0 + m] = n
        sw[member0 + m] = bary[n, r] * pre[n]
    for ch in range(start, chunk_vertex.shape[0], stride):
        v = chunk_vertex[ch]
        all_chunk_begin[chunk0 + ch] = member0 + chunk_begin[ch]
        chunk_row[chunk0 + ch] = base + v if chunk_first[v + 1] - chunk_first[v] == 1 else -1
    for i in range(start, multi.shape[0], stride):
        v = multi[i]
        all_multi[multi0 + i, 0] = base + v
        all_multi[multi0 + i, 1] = chunk0 + chunk_first[v]
        all_multi[multi0 + i, 2] = chunk0 + chunk_first[v + 1]
    for t in range(start, d1 * M * 2, stride):  # neighbour v' + 1 (0: none) → row base + v'
        j, v, side = t // (2 * M), (t // 2) % M, t % 2
        a = neighbours[j, v, side]
        all_neighbours[j, base + v, side] = a + (base - 1) if a > 0 else 0
    for t in range(start, N * d1, stride):
        n, r = t // d1, t % d1
        slice_rows[n, col0 + r] = half + base + offsets[t]
        slice_w[n, col0 + r] = bary[n, r] * (post[n] * alpha)


class MeanFieldCUDA:
    """Mean-field inference in one launch, for kernels with Potts compatibilities.

    ``MeanFieldCUDA(lattices, pres, posts, C)``: LatticeCUDA objects over the same N points,
    each with its per-point factors before splatting and after slicing (the normalisation;
    the slice's also times the Potts weight), for C labels.  ``run(unary, n)``: Q (C, N)
    after n iterations from the energies ``unary`` (C, N) — what DenseCRF.inference computes
    step by step.  ``None`` from ``make`` where the one-launch kernel cannot run (then go
    step by step).
    """

    @classmethod
    def make(cls, lattices, pres, posts, C):
        self = cls(lattices, pres, posts, C)
        return self if self.blocks > 0 else None

    def __init__(self, lattices, pres, posts, C):
        xp = self.xp = lattices[0].xp
        N = self.N = lattices[0].N
        self.C = C
        # vertex rows: 0 is the zero row, then each lattice's vertices (lattice k from base[k])
        base = np.cumsum([1] + [lat.M for lat in lattices]).tolist()
        R = self.R = base[-1]
        d1s = [lat.d + 1 for lat in lattices]
        # where each lattice's members, chunks, long vertices and slice columns begin
        member0, chunk0, multi0, col0 = (np.cumsum([0] + sizes).tolist() for sizes in (
            [int(lat.members.shape[0]) for lat in lattices],
            [int(lat.chunk_vertex.shape[0]) for lat in lattices],
            [int(lat.multi.shape[0]) for lat in lattices], d1s))
        f32, i32 = xp.float32, xp.int32
        a = self.args = dict(
            pt=xp.empty(member0[-1], i32), sw=xp.empty(member0[-1], f32),
            chunk_begin=xp.full(chunk0[-1] + 1, member0[-1], xp.int64),  # (the end, last)
            chunk_row=xp.empty(chunk0[-1], i32), partial=xp.empty((chunk0[-1], C), f32),
            multi=xp.empty((multi0[-1], 3), xp.int64),
            neighbours=xp.full((max(d1s), R, 2), -1, i32),
            buf=xp.zeros((2 * R, C), f32),  # rows 0 and R stay zero
            slice_rows=xp.empty((N, col0[-1]), i32), slice_w=xp.empty((N, col0[-1]), f32),
            slice_starts=xp.asarray(col0, dtype=i32))
        a = self.args = {name: _view(array) for name, array in a.items()}
        for i, (lat, pre, post) in enumerate(zip(lattices, pres, posts)):
            k = lat._k
            launch(_side_by_side_kernel, max(lat.members.shape[0], lat.M * d1s[i] * 2),
                   k["members"], k["bary"], lat._factor(pre, np.dtype(np.float32)),
                   lat._factor(post, np.dtype(np.float32)), lat.alpha, k["chunk_begin"],
                   k["chunk_vertex"], k["chunk_first"], k["multi"], k["neighbours"],
                   k["offsets"], base[i], (d1s[i] % 2) * R, member0[i], chunk0[i], multi0[i],
                   col0[i], a["pt"], a["sw"], a["chunk_begin"], a["chunk_row"], a["multi"],
                   a["neighbours"], a["slice_rows"], a["slice_w"])
        n_chunks = chunk0[-1]
        self.base = _view(xp.empty((N, C), dtype=xp.float32))
        self.q = _view(xp.empty((N, C), dtype=xp.float32))
        self.lock = threading.Lock()  # base, q, buf, partial: scratch for one run at a time
        self.work = max(N * C, n_chunks * C, R * C)  # the most parallel work of a step
        self.blocks = _cooperative_blocks(_mean_field_kernel, lambda: self._launch_args(
            xp.empty((C, N), xp.float32), True, 0, True, xp.empty((C, N), xp.float32)),
            np.float32)

    def _launch_args(self, unary, first, iterations, last, out):
        a = self.args
        return (unary, first, np.int64(iterations), last, self.base, self.q, out, a["pt"],
                a["sw"], a["chunk_begin"], a["chunk_row"], a["partial"], a["multi"],
                a["neighbours"], a["buf"], a["slice_rows"], a["slice_w"], a["slice_starts"])

    def run(self, unary, iterations):
        """Q (C, N) float32 after ``iterations`` mean-field steps from the energies (C, N)."""
        unary = self.xp.ascontiguousarray(unary, dtype=self.xp.float32)
        if unary.shape != (self.C, self.N):
            raise ValueError(f"unary must be ({self.C}, {self.N}), got {unary.shape}")
        out = self.xp.empty((self.C, self.N), dtype=self.xp.float32)
        unary_view, out_view = _view(unary), _view(out)
        blocks = min(self.blocks, math.ceil(self.work / THREADS))
        done = 0
        with self.lock:
            while True:  # one launch for up to ITERATIONS_PER_LAUNCH iterations
                n = min(ITERATIONS_PER_LAUNCH, iterations - done)
                last = done + n == iterations
                _mean_field_kernel[blocks, THREADS](*self._launch_args(
                    unary_view, done == 0, n, last, out_view))
                done += n
                if last:
                    return out
