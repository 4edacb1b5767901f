"""The dense CRF's mean field in one CUDA launch (``MeanFieldCUDA``).

A mean-field iteration of the dense CRF is, per kernel, a splat (two launches), a blur (one)
and a slice (one), then a softmax: nine launches with two kernels, ninety for ten iterations.
On a GPU each costs the host tens of µs of Python (numba-cuda converts every argument on every
launch), more than the GPU needs for the work itself at photo sizes.  So where every kernel
has a Potts compatibility (densecrf's default), the whole inference runs in one launch that
waits at grid-wide barriers between its steps.  The kernels' lattices are laid side by side
(``MeanFieldCUDA``): one vertex buffer, its rows lattice after lattice, so each step covers
all kernels at once, and the constant per-point factors are folded into the splat and slice
weights beforehand — the same products, so the same bits, as step by step.

Iterations per launch are at most ITERATIONS_PER_LAUNCH: a launch that runs for seconds (a
large image, hundreds of iterations) would trip the watchdog of a GPU that also drives a
display.  Ten-iteration runs take one launch; longer ones go on from Q where the last left it.
"""
import math
import threading

import numba
import numpy as np

from tinydeeplab.backend import cuda_simulator

from .._common import THREADS, launch
from .._cuda import cuda
from ..softmax_cuda import softmax_row
from .cuda import _cooperative_blocks, _view

ITERATIONS_PER_LAUNCH = 25
# Blocks of THREADS that the compiler must let each multiprocessor hold at once.  A cooperative
# launch can have no more blocks than fit on the GPU together, and left to itself the compiler
# gives this kernel 104 registers a thread: 4 blocks per multiprocessor, too few threads in
# flight to hide the memory latency of its scattered reads.  Eight caps it at 64 registers
# (65536 / (8 · 128); ptxas spills a few hundred bytes of array descriptors to the cache).
# benchmarks/sweep_mean_field.py measures the caps against each other and the plain loop.
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
    def make(cls, lattices, pres, posts, C, kernel=None):
        self = cls(lattices, pres, posts, C, kernel)
        return self if self.blocks > 0 else None

    def __init__(self, lattices, pres, posts, C, kernel=None):
        self.kernel = _mean_field_kernel if kernel is None else kernel  # (see compile_kernel)
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
        self.blocks = _cooperative_blocks(self.kernel, lambda: self._launch_args(
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
                self.kernel[blocks, THREADS](*self._launch_args(
                    unary_view, done == 0, n, last, out_view))
                done += n
                if last:
                    return out


def compile_kernel(min_blocks=None):
    """The one-launch mean-field kernel compiled anew with launch bounds for ``min_blocks``
    blocks per multiprocessor (None: none), for ``MeanFieldCUDA(..., kernel=)`` —
    benchmarks/sweep_mean_field.py measures the caps against each other."""
    source = _mean_field_kernel.py_func
    return (cuda.jit if min_blocks is None else _jit_bounded(min_blocks))(source)
