"""The permutohedral lattice on the CPU, fast: ``cpu``'s steps scheduled for a few cores.

The same lattice and the same sums as ``cpu`` (the plain rung below it; results equal up to
the order of float32 additions), built and filtered with what makes it fast:

- the build (``cpu_fast_build``): steps 1-3 vectorised over blocks of points, packed keys,
  hash tables per block of corners, a radix sort and a merge for the blur neighbours;
- splat by scatter, a thread per block of points (``cpu_fast_steps``), 8-wide row operations
  and prefetches (``cpu_fast_rows``);
- the blur in the order that keeps neighbours close, its passes in one sweep through small
  rings where they fit (``blur_in_one_sweep``);
- for a grid-like lattice with a large buffer, the whole filter in one sweep, the vertex
  buffer never made (``cpu_fast_stream``; ``stream_pays``);
- in the CRF's mean field (``MeanFieldCPU``): two kernels splatted in one pass over Q
  (``splat_together_pays``), the softmax fused into the last slice.

Each rule that chooses by size is a function below, with its reason.  The figures behind them
are in benchmarks/RESULTS.md and docs/optimisation-notes.md.
"""
import contextlib
import threading

import numba
import numpy as np

from ..softmax import softmax_rows
from ..transpose import transpose
from .cpu import per_point
from .cpu_fast_build import (_group_by_vertex_cpu, _mean_step, _merge_neighbours_cpu,
                             _radix_argsort_cpu, _reach_cpu, _simplices_cpu,
                             _to_buffer_order_cpu, key_bounds, key_layout, number_corners)
from .cpu_fast_steps import (FUSED_TILE, _blur_direction_cpu, _blur_fused_cpu, _slice_cpu,
                             _splat_gather_cpu, _splat_scatter_cpu, _splat_scatter_two_cpu,
                             scatter_plan)
from .cpu_fast_stream import _filter_streamed_cpu, _stream_tables_cpu
from .reference import elevation_scale


# ---- choices by size ----------------------------------------------------------------------------
STREAM_BYTES = 4 << 20
SPLAT_TOGETHER_BYTES = 8 << 20
PREFETCH_BYTES = 1 << 20
SCATTER_EXTRA_BYTES = 256 << 20


def stream_pays(M, c):
    """Filter a grid-like lattice in one sweep where its float32 vertex buffer (M × c) would
    be larger than STREAM_BYTES: then the buffer no longer stays in the caches between splat,
    blur and slice, and never making it saves its trips through memory; smaller buffers
    stay cached, and the sweep's bookkeeping costs more than it saves."""
    return M * c * 4 > STREAM_BYTES


def rings_fit(M, threads, rows):
    """The one-sweep schedules need rings of ``rows`` rows per thread: worth it only while
    the threads' rings together hold fewer rows than the M-row buffer they replace."""
    return threads * rows <= M


def blur_in_one_sweep(M, c, threads, rows):
    """Blur all d+1 passes in one sweep (``_blur_fused``) where the rings fit and there is
    more than one channel: for one channel (the kernel normalisation, once per lattice) the
    sweep's bookkeeping costs more than the memory traffic it saves."""
    return c > 1 and rings_fit(M, threads, rows)


def splat_together_pays(buffer_bytes):
    """Splat two lattices in one pass over the values while their buffers together
    (``buffer_bytes``) fit in SPLAT_TOGETHER_BYTES: beyond that the two streams of writes
    evict each other's rows from the caches and two passes are faster."""
    return buffer_bytes <= SPLAT_TOGETHER_BYTES


def prefetch_pays(buffer_bytes):
    """Prefetch the rows a slice (or a splat whose rows are scattered: the lattice blurred in
    sorted order) will touch a few points ahead only in a buffer larger than PREFETCH_BYTES:
    a smaller one stays in the caches, where prefetches cost more than they hide.  (A grid's
    points splat into neighbouring rows, which the hardware prefetcher finds by itself.)"""
    return buffer_bytes > PREFETCH_BYTES


def splat_by_scatter(M, extra_rows, extra_bytes):
    """Splat by scatter (a thread per block of points) unless the rows the blocks share, kept
    private per thread, would need more rows than the buffer itself or SCATTER_EXTRA_BYTES:
    then by gather (a thread per vertex, reading its scattered points)."""
    return extra_rows <= M and extra_bytes <= SCATTER_EXTRA_BYTES


def _slice_start(out, base, N, c, dt):
    """(out, base, start) for _slice: out (N, c) made if None; start 0 (no base: from 0), 1
    (no base but an out: add to it) or 2 (from base, made C-contiguous of dtype dt); base is
    an array in every case (out for 0 and 1), so the kernel compiles one way."""
    if out is None:
        out = np.empty((N, c), dtype=dt)
        if base is None:
            return out, out, 0
    if base is None or base is out:
        return out, out, 1
    return out, np.ascontiguousarray(base, dtype=dt), 2


def splat_together(lattices, values, pres, together=None):
    """``lattice.splat(values, pre)`` for each lattice (all over the same points): for two
    that both splat by scatter, in one pass over the values (``_splat_scatter_two``) where
    ``together`` (None: ``splat_together_pays``), else one after the other.  Each lattice's
    ``lock`` must be held, as for ``splat``."""
    if len(lattices) == 2 and values.dtype == np.float32 and values.shape[1] > 1 and \
            together is not False:
        first, second = lattices
        work = [lat._work_buffers(values.shape[1], np.float32) for lat in lattices]
        if all(rows is not None for _, _, rows in work) and (together or splat_together_pays(
                work[0][0].nbytes + work[1][0].nbytes)):
            values = np.ascontiguousarray(values)
            pres = [per_point(pre, lat.N, np.float32) for lat, pre in zip(lattices, pres)]
            _splat_scatter_two_cpu(values, pres[0], first.bary, first.offsets, *first._bands(),
                                   work[0][2], pres[1], second.bary, second.offsets,
                                   *second._bands(), work[1][2], second.prefetches(work[1][0]))
            for lat, (buf, scratch, _) in zip(lattices, work):
                lat._splatted = buf, scratch
            return
    for lat, pre in zip(lattices, pres):
        lat.splat(values, pre)


class LatticeCPU:
    """The lattice for one set of features, built once, then used for any number of filters."""

    def __init__(self, features):
        features = np.ascontiguousarray(features, dtype=np.float32)  # (N, d)
        N, d = features.shape
        self.N, self.d = N, d
        scale = elevation_scale(d)
        low, high = key_bounds(features, scale)
        word_of, shift_of, W = key_layout(low, high)
        self._key_fields = (low, high, word_of, shift_of)
        words = np.empty((N * (d + 1), W), dtype=np.int64)
        self.bary = np.empty((N, d + 1), dtype=np.float32)
        bad = np.zeros(1, dtype=np.int64)
        ones = np.zeros(W, dtype=np.int64)
        wrap = np.zeros(d, dtype=np.int64)
        for i in range(d):
            ones[word_of[i]] += 1 << int(shift_of[i])
            wrap[i] = (d + 1) << int(shift_of[i])
        _simplices_cpu(features, scale, low, high - low, word_of, shift_of, ones, wrap, words,
                       self.bary, bad)
        if bad[0]:
            raise RuntimeError("permutohedral: a vertex key fell outside the bounds of "
                               "key_bounds (a bug; please report it with the features)")
        self._number_vertices(words)
        self._plan_blur()
        self.alpha = np.float32(1.0 / (1.0 + 2.0 ** (-d)))
        self._work = {}
        self._band_plans = {}
        self._ring_plans = {}
        self.lock = threading.RLock()  # see filter and _work_buffers
        self._splatted = None  # (buffer, scratch) of the last splat

    def _number_vertices(self, words):
        """M, vertex_words (M, W) and offsets (K,): the vertex of each of the K = N·(d+1)
        simplex corners (their keys packed in ``words``), vertices numbered in order of first
        appearance."""
        B = max(1, min(numba.get_num_threads(), words.shape[0]))
        table_size = 1 << max(4, int(np.ceil(np.log2(max(self.N // B, 1)))))
        self.M, self.vertex_words, self.offsets = number_corners(words, B, table_size)

    @property
    def vertex_keys(self):
        """(M, d) int32: the first d coordinates of each vertex (unpacked from
        ``vertex_words`` on first use)."""
        if not hasattr(self, "_vertex_keys"):
            low, high, word_of, shift_of = self._key_fields
            keys = np.empty((self.M, self.d), dtype=np.int32)
            for i in range(self.d):
                mask = (1 << max(1, int(high[i] - low[i]).bit_length())) - 1
                keys[:, i] = ((self.vertex_words[:, word_of[i]] >> shift_of[i]) & mask) + low[i]
            self._vertex_keys = keys
        return self._vertex_keys

    def _plan_blur(self):
        """The blur's neighbour tables and the order it visits the vertices in.

        Neighbours: sort the keys (order[u]: the vertex at sorted place u) and merge them with
        themselves, one step apart.  Order: splat and slice want the order of first appearance
        (consecutive pixels, consecutive rows), and the buffers are kept in it.  For a grid (the
        spatial kernel) the blur neighbours are close in that order too.  For the bilateral
        kernel they are scattered (colour steps), while in sorted order a step along any
        direction moves every key coordinate by a constant, so the neighbours lie in a few
        sliding windows that stay in cache: the blur's first pass then gathers the buffer into
        sorted order and its last pass scatters back.
        rows[u]: the buffer row of the vertex the blur visits at place u; neighbours[j, u]:
        1 + the places of its neighbours along direction j (0: none)."""
        M, d = self.M, self.d
        words = self.vertex_words  # packed with room for a blur step (key_bounds)
        low, high, word_of, shift_of = self._key_fields
        order = _radix_argsort_cpu(words, numba.get_num_threads() if M >= 1 << 14 else 1)
        steps = np.zeros((d + 1, words.shape[1]), dtype=np.int64)  # step_j, packed
        for j in range(d + 1):
            for i in range(d):
                steps[j, word_of[i]] += (d if i == j else -1) << int(shift_of[i])
        sorted_neighbours = np.zeros((d + 1, M, 2), dtype=np.int32)
        _merge_neighbours_cpu(words[order], steps, sorted_neighbours)
        buffer_rows = np.concatenate([np.zeros(1, np.int32), (order + 1).astype(np.int32)])
        self.sorted = (_mean_step(sorted_neighbours, None) * 2
                       < _mean_step(sorted_neighbours, buffer_rows))
        if self.sorted:
            self.rows = buffer_rows[1:]
            self.neighbours = sorted_neighbours
        else:  # visit in buffer order: place u is row u + 1
            self.rows = np.arange(1, M + 1, dtype=np.int32)
            self.neighbours = np.empty_like(sorted_neighbours)
            _to_buffer_order_cpu(sorted_neighbours, order, buffer_rows, self.neighbours)
        self.places = np.arange(1, M + 1, dtype=np.int32)  # rows of the blur-order buffers
        # the first pass reads the neighbours' rows in ``buf``: for directions 0 and d (first
        # in the forward and in the transposed filter)
        self.buffer_neighbours = {j: np.take(buffer_rows, self.neighbours[j]) if self.sorted
                                  else self.neighbours[j] for j in (0, d)}

    def filter(self, values, reverse=False, pre=None, post=None, out=None, base=None,
               schedule=None):
        """values (N, c) float32 -> (N, c) float32: splat, blur along d+1 directions, slice.

        Optional per-point factors: ``pre`` (N,) scales the values before splatting, ``post``
        (N,) the result; with ``out`` given the result is *added* to it, or to ``base``
        (N, c) if that is given too, and written to ``out`` (the CRF's fused message passing:
        one pass over the pixels instead of four).  float64 values are filtered in float64
        (the same linear operator, for gradient checks).  ``schedule``: "steps" (splat, blur,
        slice), "stream" (``stream``) or None — ``streams`` decides.
        """
        with self.lock:
            if schedule == "stream" or (schedule is None and values.dtype == np.float32 and
                                        values.ndim == 2 and
                                        self.streams(values.shape[1], reverse) and
                                        (out is None or not np.shares_memory(out, values))):
                return self.stream(values, pre, post, out, base, reverse=reverse)
            self.splat(values, pre)
            return self.slice(self.blur(reverse), post, out, base)

    def streams(self, c, reverse=False):
        """Whether the default schedule filters c float32 channels in one sweep
        (``stream``): where ``stream_pays`` and the lattice is grid-like."""
        if not stream_pays(self.M, c):  # (checked first: the plan costs a dry run)
            return False
        plan = self._stream_plan(c, reverse)
        return plan is not None and rings_fit(self.M, *plan[-1].shape[:2])

    def stream(self, values, pre=None, post=None, out=None, base=None, softmax=False,
               reverse=False):
        """The filter of values (N, c) float32 (the transposed one with ``reverse``) as
        ``filter`` with ``slice``'s arguments, in one sweep through small rings
        (_filter_streamed) instead of through the vertex buffer, whatever its size.  ``out``
        must not share memory with ``values`` (a thread's sweep reads the values of points
        beyond its share, which another thread may have written already).  Hold ``lock``."""
        c = values.shape[1]
        plan = self._stream_plan(c, reverse)
        if plan is None:
            raise ValueError(f"stream: this lattice does not stream {c} channels (it is not "
                             f"grid-like, or c = 1)")
        if out is not None and np.shares_memory(out, values):
            raise ValueError("stream: out must not share memory with values")
        tables, reach, directions, masks, bases, rings = plan
        values = np.ascontiguousarray(values, dtype=np.float32)
        pre, post = per_point(pre, self.N, np.float32), per_point(post, self.N, np.float32)
        out, base, start = _slice_start(out, base, self.N, c, np.float32)
        spans = np.zeros((rings.shape[0], len(bases)), np.int64)
        _filter_streamed_cpu(values, pre, self.bary, self.offsets, post, self.alpha, base,
                             out, start, softmax, self.rows, self.neighbours, directions, reach,
                             *tables, masks, bases, rings, False, spans)
        if (spans > masks + 1).any():
            raise RuntimeError("permutohedral: a ring of the streamed filter overflowed (a "
                               "bug; please report it with the features)")
        return out

    # The three steps one at a time, for callers that interleave the steps of several
    # lattices (the CRF splats every kernel's lattice before any slice writes the pixels'
    # new values, so those can overwrite the values splatted).  The vertex buffers are the
    # lattice's own and reused by the next splat: hold ``lock`` from splat to slice.
    def splat(self, values, pre=None):
        """Step 4: the vertex buffer ← Σ over points of weight · pre · value (values (N, c);
        float64 values are splatted in float64)."""
        dt = np.float64 if values.dtype == np.float64 else np.float32
        values = np.ascontiguousarray(values, dtype=dt)
        pre = per_point(pre, self.N, dt)
        buf, scratch, rows = self._work_buffers(values.shape[1], dt)
        if rows is not None:
            _splat_scatter_cpu(values, pre, self.bary, self.offsets, *self._bands(), rows,
                               self.prefetches(buf))
        else:
            starts, members = self.members_by_vertex()
            _splat_gather_cpu(values, pre, self.bary, starts, members, buf)
        self._splatted = buf, scratch

    def blur(self, reverse=False, sweep=None):
        """Step 5 on the buffer of the last splat; returns the blurred vertex buffer.
        ``sweep``: all passes in one sweep (True), pass by pass (False), or as
        ``blur_in_one_sweep`` decides (None)."""
        if self._splatted is None:
            raise RuntimeError("blur needs a splat first (LatticeCPU.splat)")
        buf, scratch = self._splatted
        return self._blur(buf, scratch, reverse, sweep)

    def slice(self, blurred, post=None, out=None, base=None, softmax=False):
        """Step 6: (N, c) values read back from the vertex buffer ``blurred`` (from ``blur``),
        with ``post``, ``out`` and ``base`` as in ``filter``; ``softmax``: then each row of
        the result replaced by its softmax (the CRF's normalisation, fused)."""
        dt = blurred.dtype.type
        post = per_point(post, self.N, dt)
        out, base, start = _slice_start(out, base, self.N, blurred.shape[1], dt)
        fused = softmax and dt == np.float32  # the fused softmax is float32's
        _slice_cpu(blurred, self.bary, self.offsets, post, dt(self.alpha), base, out, start,
                   fused, prefetch_pays(blurred.nbytes))
        if softmax and not fused:
            softmax_rows(out, out)
        return out

    def prefetches(self, buf):
        """Whether a splat into ``buf`` prefetches its rows (``prefetch_pays``)."""
        return self.sorted and prefetch_pays(buf.nbytes)

    def members_by_vertex(self):
        """(starts, members): the entries n·(d+1) + r of vertex v are
        members[starts[v]:starts[v+1]], in point order.  Only the gather splat needs them,
        so they are made on its first call."""
        if not hasattr(self, "_members"):
            starts = np.zeros(self.M + 2, dtype=np.int64)
            members = np.empty(self.offsets.shape[0], dtype=np.int64)
            _group_by_vertex_cpu(self.offsets, self.M, starts, members)
            self._members = starts[: self.M + 1], members
        return self._members

    def _blur(self, buf, scratch, reverse, sweep=None):
        """Blur along the d+1 directions (in reverse order for the transposed filter); returns
        the array holding the result, rows in buffer order like ``buf``: in one sweep
        (_blur_fused) where ``sweep`` or ``blur_in_one_sweep`` says so, else pass by pass.

        Pass by pass, the passes alternate ``buf`` and ``scratch``.  Visiting in sorted order,
        the first pass gathers ``buf`` into sorted order, the passes in between keep that order
        and the last one scatters back into buffer order."""
        directions = list(range(self.d, -1, -1) if reverse else range(self.d + 1))
        c = buf.shape[1]
        if sweep is None:  # (c first: the rings' shape needs the neighbours' reach)
            sweep = c > 1 and blur_in_one_sweep(self.M, c, *self._ring_shape(directions))
        if sweep:  # the rings are allocated only for a sweep that runs
            reach, masks, bases, ring_rows = self._rings(directions, c, buf.dtype)
            _blur_fused_cpu(buf, self.rows, self.buffer_neighbours[directions[0]][None],
                            self.neighbours, np.array(directions, np.int64), reach, masks,
                            bases, ring_rows, scratch, self.sorted)
            return scratch
        last = len(directions) - 1
        src, src_rows = buf, self.rows
        for i, j in enumerate(directions):
            neighbours = self.buffer_neighbours[j] if i == 0 else self.neighbours[j]
            dst = scratch if i % 2 == 0 else buf
            dst_rows = self.rows if self.sorted and i == last else self.places
            gathering = self.sorted and i == 0  # reads buf in an order of its own
            _blur_direction_cpu(src, src_rows, dst, dst_rows, neighbours, gathering)
            src, src_rows = dst, self.places
        return src

    def _ring_sizes(self, directions):
        """(reach, sizes): the largest neighbour distance of each pass in this order of
        directions, and the rows of the ring each pass but the last writes (a power of two)."""
        reach = self._reach()[directions]
        # pass i's ring is read by pass i+1, which runs reach[i+1] places behind it and
        # reads up to reach[i+1] places on either side, while pass i moves a tile ahead
        sizes = [1 << int(2 * reach[i + 1] + FUSED_TILE + 1).bit_length()
                 for i in range(len(directions) - 1)]
        return reach, sizes

    def _ring_shape(self, directions):
        """(threads, rows per thread) of _blur_fused's rings for this order of directions."""
        return max(1, min(numba.get_num_threads(), self.M)), \
            1 + sum(self._ring_sizes(directions)[1])

    def _rings(self, directions, c, dt):
        """(reach, masks, bases, rows) for _blur_fused in this order of directions, c channels
        of dtype dt and the current number of threads, made on first use and kept."""
        T = max(1, min(numba.get_num_threads(), self.M))
        key = (tuple(directions), c, np.dtype(dt).str, T)
        if key not in self._ring_plans:
            reach, sizes = self._ring_sizes(directions)
            bases = np.cumsum([1] + sizes[:-1]).astype(np.int64)  # row 0: the zero row
            rows = np.empty((T, 1 + sum(sizes), c), dt)
            rows[:, 0] = 0
            self._ring_plans[key] = (reach, np.array(sizes, np.int64) - 1, bases, rows)
        return self._ring_plans[key]

    def _stream_plan(self, c, reverse=False):
        """(tables, reach, directions, masks, bases, rings) for _filter_streamed with c
        float32 channels, the blur's directions in order (reversed: the transposed filter)
        and the current number of threads, made on first use and kept; None where the
        lattice cannot stream (not grid-like, or one channel).  The rings' sizes come from a
        run of the schedule alone: the most rows each ring held, rounded up to a power of
        two (so that a slot is an AND)."""
        T = max(1, min(numba.get_num_threads(), self.N))
        key = ("stream", c, reverse, T)
        if key not in self._ring_plans:
            plan = None
            if not self.sorted and c > 1:
                if not hasattr(self, "_stream_tables"):
                    tables = (np.empty(self.N, np.int64), np.empty(self.N, np.int64),
                              np.empty(self.M, np.int64), np.empty(self.M, np.int64))
                    _stream_tables_cpu(self.offsets, self.M, *tables)
                    self._stream_tables = tables
                directions = np.arange(self.d + 1, dtype=np.int64)
                if reverse:
                    directions = directions[::-1].copy()
                reach = self._reach()[directions]  # per pass
                one = np.zeros((1, c), np.float32)
                spans = np.zeros((T, self.d + 2), np.int64)
                dummy = np.zeros((1, 1, c), np.float32)
                _filter_streamed_cpu(one, one[0], self.bary, self.offsets, one[0], self.alpha,
                                     one, one, 1, False, self.rows, self.neighbours, directions,
                                     reach, *self._stream_tables, np.zeros(self.d + 2, np.int64),
                                     np.zeros(self.d + 2, np.int64), dummy, True, spans)
                sizes = [1 << int(max(1, s) - 1).bit_length() for s in spans.max(axis=0)]
                rings = np.empty((T, 1 + sum(sizes), c), np.float32)
                rings[:, 0] = 0
                masks = np.array(sizes, np.int64) - 1
                bases = np.cumsum([1] + sizes[:-1]).astype(np.int64)
                plan = (self._stream_tables, reach, directions, masks, bases, rings)
            self._ring_plans[key] = plan
        return self._ring_plans[key]

    def _reach(self):
        """reach[j]: the largest place distance to a blur neighbour along direction j."""
        if not hasattr(self, "_reach_of"):
            self._reach_of = np.zeros(self.d + 1, np.int64)
            _reach_cpu(self.neighbours, self._reach_of)
        return self._reach_of

    def _work_buffers(self, c, dt):
        """The vertex buffers for c channels of dtype dt, allocated on first use and kept: the
        CRF filters with the same lattice every iteration, and fresh tens of megabytes each
        time cost more in page faults than the blur itself.  (So filter one lattice from one
        thread at a time — ``lock`` sees to that.)"""
        key = (c, np.dtype(dt).str, numba.get_num_threads())
        if key not in self._work:
            # The scatter's private rows follow the buffer's in one array (``rows``; ``buf``
            # is its first M + 1 rows).
            extra = self._bands()[2][-1]
            scatter = splat_by_scatter(self.M, extra, extra * c * np.dtype(dt).itemsize)
            rows = np.empty((self.M + 1 + (extra if scatter else 0), c), dtype=dt)
            buf = rows[: self.M + 1]
            buf[0] = 0  # row 0: the "missing neighbour" zero row
            scratch = np.empty_like(buf)  # the blur's other array: every pass writes rows
            scratch[0] = 0  # 1..M before the next reads them; row 0 stays the zero row
            self._work[key] = (buf, scratch, rows if scatter else None)
        return self._work[key]

    def _bands(self):
        """scatter_plan for the current number of threads, made once."""
        T = numba.get_num_threads()
        if T not in self._band_plans:
            self._band_plans[T] = scatter_plan(self.offsets, self.d + 1, self.M, T)
        return self._band_plans[T]


class MeanFieldCPU:
    """The CRF's mean field with Potts kernels, scheduled for the CPU.

    ``MeanFieldCPU(lattices, pres, posts)``: LatticeCPU objects over the same N points with
    their per-point factors before splatting and after slicing (the normalisation; after
    slicing also times the Potts weight).  ``run(unary, n)``: Q (C, N) after n iterations from
    the energies U (C, N) — the loop of ``DenseCRF.inference``, with its steps rearranged:

    - every kernel splats Q before any slice writes, so the new log-potentials go into Q's
      own array and the softmax normalises them in place (one (N, C) array less to stream);
    - two kernels splat in one pass over Q where that pays (``splat_together``);
    - the blurs run last-splatted first (its buffer is the one still in the caches);
    - the last slice applies the softmax to each block of pixels while it is in the caches;
    - a first kernel that ``streams`` (DeepLab's spatial one) filters in one sweep into an
      array of its own (a thread's sweep reads pixels beyond its share of Q), before the
      other kernels splat, so that their buffers stay in the caches from splat to slice.
    ``stream`` / ``together``: force those choices (True / False) instead of the rules.
    """

    def __init__(self, lattices, pres, posts, stream=None, together=None):
        if not lattices:
            raise ValueError("MeanFieldCPU needs at least one kernel")
        self.lattices, self.pres, self.posts = list(lattices), list(pres), list(posts)
        self.stream, self.together = stream, together

    @classmethod
    def make(cls, lattices, pres, posts, C):
        return cls(lattices, pres, posts)

    def run(self, unary, iterations):
        """Q (C, N) float32 after ``iterations`` mean-field steps from the energies (C, N)."""
        return transpose(self.run_rows(transpose(unary, -1.0), iterations))

    def run_rows(self, neg_unary, iterations):
        """``run`` with pixels in rows: −U (N, C) float32 in, Q (N, C) out."""
        lattices, pres, posts = self.lattices, self.pres, self.posts
        Q = softmax_rows(neg_unary, np.empty_like(neg_unary))
        C = Q.shape[1]
        streamed = lattices[0].streams(C) if self.stream is None else self.stream
        logits = np.empty_like(Q) if streamed else None
        with contextlib.ExitStack() as held:  # each lattice's buffers, from splat to slice
            for lat in lattices:
                held.enter_context(lat.lock)
            for _ in range(int(iterations)):
                rest, start = lattices, neg_unary  # the first message starts from −U
                if streamed:  # the first kernel's whole message in one sweep, into `logits`
                    rest, start = lattices[1:], logits
                    lattices[0].stream(Q, pres[0], posts[0], out=logits, base=neg_unary,
                                       softmax=not rest)
                    if not rest:  # the new Q is normalised in `logits`: swap the arrays
                        Q, logits = logits, Q
                        continue
                    # the others splat after the sweep (it leaves Q as it was), so their
                    # buffers go from splat to blur to slice without the sweep in between
                    splat_together(rest, Q, pres[1:], self.together)
                else:
                    splat_together(lattices, Q, pres, self.together)
                blurred = [lat.blur() for lat in reversed(rest)][::-1]
                for i, lat in enumerate(rest):
                    lat.slice(blurred[i], posts[len(lattices) - len(rest) + i], out=Q,
                              base=start if i == 0 else None, softmax=i == len(rest) - 1)
        return Q
