"""Fast CPU lattice, part 4: a grid's whole filter (splat, blur, slice) in one sweep.

For a pixel grid (the CRF's spatial kernel) the vertices are numbered in the order the pixels
first touch them, so everything the filter does moves down the image together: the points
of an image row splat into vertices of about one row of vertices, a blur neighbour is at most
a row or two of vertices away, and a point slices from the vertices it splatted into.  The
one-sweep blur above already keeps its passes in small rings; here the splat feeds the first
pass through a ring too, and the slice reads the last pass's ring: the vertex buffer (tens of
megabytes for DeepLab's spatial kernel on a photograph: written by the splat, read by the
blur, written again and read by the slice, every iteration) is never made.  Each thread
slices its share of the points; everything its share needs — the places of each pass and the points
to splat — it recomputes in its own rings, a few image rows more than its share.

The schedule goes in rounds.  In each, every stage — splat, the passes, the slice — moves on
as far as the stage before it allows (a pass stays its reach behind the pass before; the
first pass reads only vertices all of whose points are splatted; the slice takes the points
whose vertices the last pass has made), but at most STREAM_TILE beyond what the stage after
it reads next, so that no ring fills with rows that wait.  Bookkeeping per lattice
(_stream_tables): top[n], the highest vertex of points 0..n; bottom[n], the lowest of points
n..N−1; first[v], the first point of vertex v (which grows with v: vertices are numbered in
order of first appearance); complete[v], how many points (from the first) cover every point
of vertices 0..v.
"""
import numpy as np
from numba import njit, prange

from .. import parallel_njit
from ..softmax import softmax_block
from .cpu_fast_build import _u
from .cpu_fast_rows import _row_add_scaled
from .cpu_fast_steps import _blur_span, _slice_points


STREAM_TILE = 256  # points or places a stage moves ahead per round, at most


def _stream_tables(offsets, M, top, bottom, first, complete):
    # All in sequential sweeps.  top: running maximum of each point's highest vertex; bottom:
    # running minimum, from the end, of each point's lowest.  A vertex first appears at the
    # first point whose corners reach it (numbered in order of first appearance, it is then
    # the highest yet): first[v] = the least n with top[n] ≥ v.  Vertices 0..v are complete
    # once every point with a corner ≤ v is in, the last of which is the last n with
    # bottom[n] ≤ v (bottom grows with n): complete[v] = that n + 1.
    N = top.shape[0]
    D = offsets.shape[0] // N
    high, low = 0, M
    for n in range(N):
        for r in range(D):
            high = max(high, offsets[n * D + r])
        top[n] = high
    for n in range(N - 1, -1, -1):
        for r in range(D):
            low = min(low, offsets[n * D + r])
        bottom[n] = low
    n = 0
    for v in range(M):
        while top[n] < v:
            n += 1
        first[v] = n
    n = 0
    for v in range(M):
        while n + 1 < N and bottom[n + 1] <= v:
            n += 1
        complete[v] = n + 1


def _splat_span(values, pre, bary, offsets, n0, n1, low, ring, row_base, row_mask):
    # points n0..n1−1 into a ring: vertex v to row row_base + (v & row_mask); vertices below
    # ``low`` are left out (points before n0 touch them too, so here they would be incomplete)
    D = _u(bary.shape[1])
    for n in range(_u(n0), _u(n1)):
        s = pre[n]
        for r in range(D):
            v = _u(offsets[n * D + r])
            if v >= low:
                _row_add_scaled(ring, row_base + (v & row_mask), bary[n, r] * s, values, n)


def _filter_streamed(values, pre, bary, offsets, post, alpha, base, out, start, softmax, rows,
                     neighbours, directions, reach, top, bottom, first, complete, masks, bases,
                     rings, simulate, spans):
    # The filter of values (N, c) along ``directions`` (reach[i]: pass i's, along
    # directions[i]) into out (base, start and softmax as for _slice), in one sweep per
    # thread through its rings (T, ., c): the splat's ring at rows bases[0] + (v & masks[0]),
    # pass i's at bases[i + 1] + (u & masks[i + 1]); row 0 the zero row.  spans[t, k]: the
    # most rows ring k had to hold at once in thread t.  With ``simulate`` only the schedule
    # runs (no arithmetic: rings may be a dummy) — to measure the spans for the rings' sizes.
    N = bary.shape[0]
    M = first.shape[0]
    P = directions.shape[0]
    T = spans.shape[0]
    for t in prange(T):
        ring = rings[t] if rings.shape[0] == T else rings[0]  # (one dummy ring: simulating)
        a, b = t * N // T, (t + 1) * N // T
        # places each pass covers: the last, every vertex of points a..b−1; the ones before,
        # the reach of the next beyond that; the splat, every point of what the first reads
        lo, hi = np.empty(P, np.int64), np.empty(P, np.int64)
        lo[P - 1], hi[P - 1] = bottom[min(a, N - 1)], top[max(b - 1, 0)] + 1
        for i in range(P - 1, 0, -1):
            lo[i - 1], hi[i - 1] = max(0, lo[i] - reach[i]), min(M, hi[i] + reach[i])
        low, high = max(0, lo[0] - reach[0]), min(M, hi[0] + reach[0])
        # splatted: points first[low]..splatted−1 are in; ready: vertices low..ready−1 complete
        splatted, ready, released, sliced = first[low], low, low, a
        done = lo.copy()  # each pass's next place
        if not simulate:
            for row in range(bases[0], bases[0] + masks[0] + 1):
                for k in range(ring.shape[1]):
                    ring[row, k] = 0
        while sliced < b:
            # every stage moves on as far as the one before it allows, but at most a tile
            # beyond what the one after it reads next: so no ring fills with rows that wait
            # (as the thread's first rows would: its halo, several tiles for every pass)
            p_end = complete[min(high, done[0] + reach[0] + STREAM_TILE) - 1]
            if p_end > splatted:
                if not simulate:
                    _splat_span(values, pre, bary, offsets, splatted, p_end, _u(low), ring,
                                _u(bases[0]), _u(masks[0]))
                splatted = p_end
                spans[t, 0] = max(spans[t, 0], top[splatted - 1] + 1 - released)
                while ready < high and complete[ready] <= splatted:
                    ready += 1
            for i in range(P):
                if i == 0:  # up to reach[i] short of what the stage before has made
                    made = hi[0] if ready == high else ready - reach[0]
                else:
                    made = hi[i] if done[i - 1] == hi[i - 1] else done[i - 1] - reach[i]
                if i < P - 1:
                    wanted = done[i + 1] + reach[i + 1] + STREAM_TILE
                else:
                    wanted = top[min(b, sliced + STREAM_TILE) - 1] + 1
                target = min(hi[i], made, wanted)
                if target <= done[i]:
                    continue
                if not simulate:
                    _blur_span(ring, ring, done[i], target, rows, neighbours, directions[i],
                               _u(bases[i]), _u(masks[i]), _u(bases[i + 1]),
                               _u(masks[i + 1]), True, True, False)
                done[i] = target
                # ring i + 1 holds from the lowest place its reader still needs up to here
                need = bottom[sliced] if i == P - 1 else done[i + 1] - reach[i + 1]
                spans[t, i + 1] = max(spans[t, i + 1], done[i] - max(lo[i], need))
                if i == 0:  # the splat's rows the first pass is done with: zero for reuse
                    dead = max(released, done[0] - reach[0])
                    if not simulate:
                        for v in range(released, dead):
                            for k in range(ring.shape[1]):
                                ring[bases[0] + (v & masks[0]), k] = 0
                    released = dead
            # the slice: the points whose vertices the last pass has made, a tile at most
            s_end = min(b, sliced + STREAM_TILE)
            if done[P - 1] < hi[P - 1]:
                n = sliced
                while n < s_end and top[n] < done[P - 1]:
                    n += 1
                s_end = n
            if s_end > sliced and not simulate:
                _slice_points(ring, _u(bases[P]), _u(masks[P]), bary, offsets, post, alpha,
                              base, out, start, sliced, s_end, False)
                if softmax:
                    softmax_block(out, out, sliced, s_end)
            sliced = s_end


_stream_tables_cpu = njit(cache=True)(_stream_tables)
_splat_span = njit(inline="always", cache=True)(_splat_span)
_filter_streamed_cpu = parallel_njit(_filter_streamed)
