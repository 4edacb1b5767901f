"""Fast CPU lattice, part 3: splat, blur and slice as scheduled for speed.

Each is ``cpu``'s plain step (same sums, same result up to the order of float32 additions)
with what makes it fast on a CPU with a few cores:

- splat by scatter (``_splat_scatter``): each thread reads its own block of points in order
  and adds into the rows of their corners; the rows two blocks share go to private rows first.
  ``_splat_scatter_two``: two lattices over the same points in one pass over the values.
- blur along a direction visiting the vertices in the order that keeps neighbours close
  (buffer order for a grid, sorted-key order for the bilateral lattice, with prefetches);
  ``_blur_fused``: all d+1 passes in one sweep through small per-thread rings.
- slice three corners at a time, optionally with the softmax of each block of rows while it
  is in the cache (the CRF's normalisation).
"""
import numba
import numpy as np
from numba import njit, prange

from .. import parallel_njit
from ..softmax import BLOCK as SOFTMAX_BLOCK
from ..softmax import softmax_block
from .cpu_fast_build import _u
from .cpu_fast_rows import (AHEAD, BLUR_AHEAD, _prefetch_row, _row_add_scaled,
                            _row_add_three, _row_blur)


def _splat_gather(values, pre, bary, starts, members, buf):
    # buf (M+1, c): row 0 is the "missing neighbour" zero row; each vertex sums its points
    # (values scaled by pre[n], the CRF's kernel normalisation), three at a time as in _slice.
    # No two iterations write the same row, so no races — but the points of one vertex are
    # scattered over the image.
    d1 = bary.shape[1]
    c = values.shape[1]
    for v in prange(buf.shape[0] - 1):
        for k in range(c):
            buf[v + 1, k] = 0
        m, end = starts[v], starts[v + 1]
        while m + 3 <= end:
            e0, e1, e2 = members[m], members[m + 1], members[m + 2]
            n0, n1, n2 = e0 // d1, e1 // d1, e2 // d1
            w0 = bary[n0, e0 - n0 * d1] * pre[n0]
            w1 = bary[n1, e1 - n1 * d1] * pre[n1]
            w2 = bary[n2, e2 - n2 * d1] * pre[n2]
            for k in range(c):
                buf[v + 1, k] += w0 * values[n0, k] + w1 * values[n1, k] + w2 * values[n2, k]
            m += 3
        for m in range(m, end):
            e = members[m]
            n = e // d1
            w = bary[n, e - n * d1] * pre[n]
            for k in range(c):
                buf[v + 1, k] += w * values[n, k]


def _point_block_rows(offsets, d1, low, high):
    # low[t], high[t]: the lowest and highest buffer row that point block t splats into
    T = low.shape[0]
    N = offsets.shape[0] // d1
    for t in prange(T):
        lo, hi = offsets.shape[0] + 1, 0
        for e in range(t * N // T * d1, (t + 1) * N // T * d1):
            lo = min(lo, offsets[e] + 1)
            hi = max(hi, offsets[e] + 1)
        low[t], high[t] = lo, hi


def scatter_plan(offsets, d1, M, T):
    """(low, ends, start) for _splat_scatter with T point blocks: block t writes rows
    low[t].., owns rows ends[t]+1..ends[t+1] and keeps its rows low[t]..ends[t] in private
    rows start[t]..start[t+1]−1; start[T] private rows in all."""
    low, high = np.empty(T, np.int64), np.empty(T, np.int64)
    _point_block_rows_cpu(offsets, d1, low, high)
    ends = np.zeros(T + 1, np.int64)
    for t in range(T):
        ends[t + 1] = max(ends[t], high[t])
    ends[T] = M
    start = np.zeros(T + 1, np.int64)
    for t in range(1, T):
        start[t + 1] = start[t] + max(0, ends[t] - low[t] + 1)
    return low, ends, start


def _splat_scatter(values, pre, bary, offsets, low, ends, start, rows, prefetch):
    # The same sum in point order: thread t splats the contiguous block t of points, reading
    # values sequentially.  rows (M+1+P, c): rows 0..M are the vertex buffer (M = ends[T]),
    # rows M+1.. private rows for the threads.  Vertices are numbered in order of first
    # appearance, so block t writes rows from low[t] up, and rows above ends[t] (the highest
    # row of the blocks before it) are written by no earlier block: those it owns, zeroes and
    # writes directly; its rows low[t]..ends[t] go to its private rows (M+1+start[t] ..
    # M+start[t+1]) and are added in at the end.  For a pixel grid that band is a row of the
    # image or two, for the bilateral kernel a fifth of the vertices.  Shared and private rows
    # live in one array, so which one a corner goes to is a choice of row number (a
    # conditional move), not a branch between two arrays: for the bilateral kernel that
    # branch would go either way at random, and the CPU would mispredict it half the time.
    T = low.shape[0]
    N, d1 = bary.shape
    c = rows.shape[1]
    M = ends[T]
    for t in prange(T):
        _clear_band(rows, ends, start, t)
        shared, shift, D = _u(ends[t]), _u(M + 1 + start[t] - low[t]), _u(d1)
        n_end = _u((t + 1) * N // T)
        for n in range(_u(t * N // T), n_end):
            if prefetch and n + _u(AHEAD) < n_end:
                _prefetch_corners(rows, offsets, n + _u(AHEAD), D, shared, shift)
            s = pre[n]
            for r in range(D):
                w = bary[n, r] * s
                row = _u(offsets[n * D + r]) + _u(1)
                row = row if row > shared else row + shift
                if c == 1:  # the kernel normalisation: one number per row
                    rows[row, 0] += w * values[n, 0]
                else:
                    _row_add_scaled(rows, row, w, values, n)
    for t in range(1, T):  # each block's private rows into the shared ones
        for row in prange(low[t], ends[t] + 1):
            for k in range(c):
                rows[row, k] += rows[M + 1 + start[t] + row - low[t], k]


def _prefetch_corners(rows, offsets, n, D, shared, shift):
    # ask for the rows that point n's D corners will splat into (shared or private)
    for r in range(D):
        row = _u(offsets[n * D + r]) + _u(1)
        _prefetch_row(rows, row if row > shared else row + shift)


def _clear_band(rows, ends, start, t):
    # zero the rows point block t of _splat_scatter writes first: those it owns and its
    # private ones
    M = ends[ends.shape[0] - 1]
    for row in range(ends[t] + 1, ends[t + 1] + 1):
        for k in range(rows.shape[1]):
            rows[row, k] = 0
    for i in range(M + 1 + start[t], M + 1 + start[t + 1]):
        for k in range(rows.shape[1]):
            rows[i, k] = 0


def _splat_scatter_two(values, pre0, bary0, offsets0, low0, ends0, start0, rows0,
                       pre1, bary1, offsets1, low1, ends1, start1, rows1, prefetch1):
    # _splat_scatter for two lattices over the same points at once (the CRF's Gaussian and
    # bilateral kernels): each point's row of values is read once and added to its corners
    # in both, where two splats read the (N, c) values twice.  The same sums in the same order: the same bits.  Both plans
    # are for the same number of point blocks; only the second lattice prefetches (the
    # bilateral one, whose rows are scattered).
    T = low0.shape[0]
    N = bary0.shape[0]
    M0, M1 = ends0[T], ends1[T]
    D0, D1 = _u(bary0.shape[1]), _u(bary1.shape[1])
    for t in prange(T):
        _clear_band(rows0, ends0, start0, t)
        _clear_band(rows1, ends1, start1, t)
        shared0, shift0 = _u(ends0[t]), _u(M0 + 1 + start0[t] - low0[t])
        shared1, shift1 = _u(ends1[t]), _u(M1 + 1 + start1[t] - low1[t])
        n_end = _u((t + 1) * N // T)
        for n in range(_u(t * N // T), n_end):
            if prefetch1 and n + _u(AHEAD) < n_end:
                _prefetch_corners(rows1, offsets1, n + _u(AHEAD), D1, shared1, shift1)
            s = pre0[n]
            for r in range(D0):
                row = _u(offsets0[n * D0 + r]) + _u(1)
                _row_add_scaled(rows0, row if row > shared0 else row + shift0, bary0[n, r] * s,
                                values, n)
            s = pre1[n]
            for r in range(D1):
                row = _u(offsets1[n * D1 + r]) + _u(1)
                _row_add_scaled(rows1, row if row > shared1 else row + shift1, bary1[n, r] * s,
                                values, n)
    c = values.shape[1]
    for t in range(1, T):  # as _splat_scatter's last step, for each lattice
        for row in prange(low0[t], ends0[t] + 1):
            for k in range(c):
                rows0[row, k] += rows0[M0 + 1 + start0[t] + row - low0[t], k]
        for row in prange(low1[t], ends1[t] + 1):
            for k in range(c):
                rows1[row, k] += rows1[M1 + 1 + start1[t] + row - low1[t], k]



def _blur_direction(src, src_rows, dst, dst_rows, neighbours, prefetch):
    # dst[dst_rows[u]] = src[src_rows[u]] + ½ (src[a] + src[b]),  (a, b) = neighbours[u];
    # with prefetch, the rows of vertex u + BLUR_AHEAD are asked for first (when src_rows jump)
    M = _u(src_rows.shape[0])
    for i in prange(src_rows.shape[0]):
        u = _u(i)
        if prefetch and u + _u(BLUR_AHEAD) < M:
            _prefetch_row(src, src_rows[u + _u(BLUR_AHEAD)])
            _prefetch_row(src, neighbours[u + _u(BLUR_AHEAD), 0])
            _prefetch_row(src, neighbours[u + _u(BLUR_AHEAD), 1])
        s, t = _u(src_rows[u]), _u(dst_rows[u])
        a, b = _u(neighbours[u, 0]), _u(neighbours[u, 1])
        if src.shape[1] == 1:  # the kernel normalisation: one number per row
            dst[t, 0] = src[s, 0] + src.dtype.type(0.5) * (src[a, 0] + src[b, 0])
        else:
            _row_blur(dst, t, src, s, a, b)


# ---- the whole blur in one sweep ------------------------------------------------------------
# Pass by pass, the blur streams the vertex buffer through memory 2(d+1) times (read, write) —
# tens of megabytes each time for the CRF's lattices, at the speed of a memory copy.  But in the
# order the blur visits the vertices, a neighbour along direction j lies at most Δ_j places away
# (a few hundred to a few thousand: image rows for a grid, slabs of the sorted keys for the
# bilateral lattice).  So pass i can follow pass i−1 at a distance: once pass i−1 has reached
# place u + Δ, pass i can do place u.  The d+1 passes then sweep the vertices together, each a
# little behind the one before, and a pass's results are needed only until the next pass has
# gone Δ beyond them: they live in a small ring of rows (place u in row u mod R), which stays in
# the caches.  Only the first pass reads the buffer, and only the last writes the result.
# Each thread sweeps its own share of places; the passes before the last also cover the places
# within reach of that share (Σ of the later passes' Δ), recomputed in the thread's own rings
# instead of waiting for the neighbouring thread.
FUSED_TILE = 256  # places the first pass moves ahead per round (the rest follow)


def _blur_span(src, dst, u0, u1, rows, neighbours, j, in_base, in_mask, out_base, out_mask,
               ring_in, ring_out, prefetch):
    # one pass over places u0..u1−1: dst[t] = src[s] + ½ (src[a] + src[b]).  From the buffer
    # (ring_in False): s = rows[u], (a, b) = neighbours[j, u] — buffer rows; from a ring: s, a,
    # b the ring rows of place u and of the places neighbours[j, u] − 1 (0: none, the zero row
    # 0).  To buffer row rows[u], or ring row out_base + (u mod R).  With prefetch, the buffer
    # rows of the place BLUR_AHEAD on are asked for first (read from src, or written in dst).
    M = _u(rows.shape[0])
    for i in range(u0, u1):
        u = _u(i)
        w0, w1 = neighbours[j, u, 0], neighbours[j, u, 1]
        ahead = prefetch and u + _u(BLUR_AHEAD) < M
        if ring_in:
            s = in_base + (u & in_mask)
            a = in_base + (_u(w0 - 1) & in_mask) if w0 > 0 else _u(0)
            b = in_base + (_u(w1 - 1) & in_mask) if w1 > 0 else _u(0)
        else:
            if ahead:
                _prefetch_row(src, rows[u + _u(BLUR_AHEAD)])
                _prefetch_row(src, neighbours[j, u + _u(BLUR_AHEAD), 0])
                _prefetch_row(src, neighbours[j, u + _u(BLUR_AHEAD), 1])
            s, a, b = _u(rows[u]), _u(w0), _u(w1)
        if ahead and not ring_out:
            _prefetch_row(dst, rows[u + _u(BLUR_AHEAD)])
        t = out_base + (u & out_mask) if ring_out else _u(rows[u])
        if src.shape[1] == 1:  # the kernel normalisation: one number per row
            dst[t, 0] = src[s, 0] + src.dtype.type(0.5) * (src[a, 0] + src[b, 0])
        else:
            _row_blur(dst, t, src, s, a, b)


def _blur_fused(src, rows, first_neighbours, neighbours, directions, reach, masks, bases,
                rings, dst, prefetch):
    # The blur along directions[0], directions[1], .. (at least two: d ≥ 1) of src (buffer
    # rows ``rows[u]`` for place u) into dst (the same rows).  first_neighbours (1, M, 2): the
    # first direction's neighbours as buffer rows; neighbours (d+1, M, 2): 1 + their places.
    # reach[i]: the largest |place distance| to a neighbour along directions[i].  rings (T, .,
    # c): thread t's rings, row 0 zero; pass i < P−1 writes place u to row bases[i] +
    # (u & masks[i]); the first pass reads src, the last writes dst.
    M = rows.shape[0]
    P = directions.shape[0]
    T = rings.shape[0]
    for t in prange(T):
        ring = rings[t]
        lo, hi = t * M // T, (t + 1) * M // T
        begin = np.empty(P, np.int64)
        end = np.empty(P, np.int64)
        done = np.empty(P, np.int64)  # each pass's next place
        halo = 0  # places beyond the thread's share that pass i must cover for the later ones
        for i in range(P - 1, -1, -1):
            begin[i], end[i] = max(0, lo - halo), min(M, hi + halo)
            done[i] = begin[i]
            halo += reach[i]
        while done[P - 1] < end[P - 1]:
            for i in range(P):
                # a tile at most per round, even where the pass before has finished: so a ring
                # never receives more than a tile of new rows while its reader is behind
                target = min(end[i], done[i] + FUSED_TILE)
                if i > 0 and done[i - 1] < end[i - 1]:  # pass i − 1 must be reach[i] ahead
                    target = min(target, done[i - 1] - reach[i])
                if target <= done[i]:
                    continue
                if i == 0:
                    _blur_span(src, ring, done[0], target, rows, first_neighbours, 0, _u(0),
                               _u(0), _u(bases[0]), _u(masks[0]), False, True, prefetch)
                elif i < P - 1:
                    _blur_span(ring, ring, done[i], target, rows, neighbours, directions[i],
                               _u(bases[i - 1]), _u(masks[i - 1]), _u(bases[i]),
                               _u(masks[i]), True, True, False)
                else:
                    _blur_span(ring, dst, done[i], target, rows, neighbours, directions[i],
                               _u(bases[i - 1]), _u(masks[i - 1]), _u(0), _u(0), True, False,
                               prefetch)
                done[i] = target


def _slice(buf, bary, offsets, post, alpha, base, out, start, softmax, prefetch):
    # out[n] = base[n] + post[n] · α · Σ_r bary[n, r] · buf[vertex(n, r)]   (start 0: from 0,
    # 1: accumulate, base is out; 2: from base); with softmax, then every row of out is
    # replaced by its softmax (the CRF's last message of an iteration: each block of pixels is
    # normalised while it is in the cache, not in another pass over all of them).  ``start``
    # comes from the caller: ``base is out`` here would update both arrays' reference counts
    # (atomic, and contended between the threads) — and a base that may be None would not be
    # one type.
    N = bary.shape[0]
    for block in prange((N + SOFTMAX_BLOCK - 1) // SOFTMAX_BLOCK):
        n0 = block * SOFTMAX_BLOCK
        n1 = min(N, n0 + SOFTMAX_BLOCK)
        _slice_points(buf, _u(1), ALL_ROWS, bary, offsets, post, alpha, base, out, start, n0,
                      n1, prefetch)
        if softmax:
            softmax_block(out, out, n0, n1)


ALL_ROWS = np.uint64(2 ** 64 - 1)  # a row mask that keeps every vertex: a whole buffer


def _slice_points(buf, row_base, row_mask, bary, offsets, post, alpha, base, out, start, n0,
                  n1, prefetch):
    # _slice for points n0..n1−1, vertex v read from row row_base + (v & row_mask) of buf
    # (the vertex buffer: 1 + v; a ring of _filter_streamed: v's slot).  The d+1 rows are
    # summed three at a time inside one loop over the channels: out[n] is then read and
    # written once per three rows, not once per row (each round trip through memory is a
    # dependency the CPU must wait for).
    N, d1 = bary.shape
    c = buf.shape[1]
    D, one = _u(d1), _u(1)
    for n in range(_u(n0), _u(n1)):
        if prefetch and n + _u(AHEAD) < _u(N):
            for r in range(D):
                _prefetch_row(buf, row_base + (_u(offsets[(n + _u(AHEAD)) * D + r]) & row_mask))
        # the first three rows add to base[n] as they write out[n] (no copy first), from
        # there on to out[n]; a start from 0, or fewer than three rows, sets out[n] first
        if start == 0:
            for k in range(c):
                out[n, k] = 0
        elif start == 2 and D < _u(3):
            for k in range(c):
                out[n, k] = base[n, k]
        p = post[n] * alpha
        r = _u(0)
        while r + _u(3) <= D:
            w0, w1, w2 = bary[n, r] * p, bary[n, r + one] * p, bary[n, r + _u(2)] * p
            e = n * D + r
            a = row_base + (_u(offsets[e]) & row_mask)
            b = row_base + (_u(offsets[e + one]) & row_mask)
            g = row_base + (_u(offsets[e + _u(2)]) & row_mask)
            onto = base if start == 2 and r == _u(0) else out
            if c == 1:  # the kernel normalisation: one number per row
                out[n, 0] = onto[n, 0] + (w0 * buf[a, 0] + w1 * buf[b, 0] + w2 * buf[g, 0])
            else:
                _row_add_three(out, n, onto, w0, w1, w2, buf, a, b, g)
            r += _u(3)
        for r in range(r, D):
            _row_add_scaled(out, n, bary[n, r] * p, buf,
                            row_base + (_u(offsets[n * D + r]) & row_mask))


_splat_gather_cpu = parallel_njit(_splat_gather)
_point_block_rows_cpu = parallel_njit(_point_block_rows)
_clear_band = njit(inline="always", cache=True)(_clear_band)
_prefetch_corners = njit(inline="always", cache=True)(_prefetch_corners)
_splat_scatter_cpu = parallel_njit(_splat_scatter)
_splat_scatter_two_cpu = parallel_njit(_splat_scatter_two)
_blur_direction_cpu = parallel_njit(_blur_direction)
_blur_span = njit(inline="always", cache=True)(_blur_span)
_blur_fused_cpu = parallel_njit(_blur_fused)
_slice_points = njit(inline="always", cache=True)(_slice_points)
_slice_cpu = parallel_njit(_slice)
