"""The fast CPU lattice's parts (kernels/permutohedral/cpu_fast*.py): its build against the
definitions, and each schedule against the plain steps it replaces."""
import numpy as np
import pytest

from crf_helpers import synthetic_scene

from tinydeeplab import crf
from tinydeeplab.kernels.permutohedral import cpu_fast as P
from tinydeeplab.kernels.permutohedral import cpu_fast_build as B


@pytest.mark.parametrize("d, c", [(1, 3), (2, 21), (3, 1), (5, 4)])
def test_slice_onto_a_base_or_into_out(d, c):
    """LatticeCPU.slice and filter with a base (added as the first three corners are, or
    copied first where there are fewer: d = 1), accumulating into out, and from 0; a
    read-only base; one channel (the kernel normalisation's path)."""

    rng = np.random.default_rng(d * 10 + c)
    lattice = P.LatticeCPU((rng.random((403, d)) * 6).astype(np.float32))
    values = rng.random((403, c)).astype(np.float32)
    base = rng.standard_normal((403, c)).astype(np.float32)
    base.flags.writeable = False
    plain = lattice.filter(values)
    onto = lattice.filter(values, out=np.full_like(values, np.nan), base=base)
    np.testing.assert_allclose(onto, base + plain, rtol=1e-6, atol=1e-5)
    added = base.copy()
    lattice.filter(values, out=added)
    np.testing.assert_array_equal(added, onto)  # the same sums in the same order
    # out given without base: added to (NaN stays NaN)
    assert np.isnan(lattice.filter(values, out=np.full_like(values, np.nan))).all()


def expected_neighbours(lattice, places):
    """Blur neighbours of the vertices the blur visits at ``places``, found by a dict of keys:
    (place, direction j, side) -> 1 + place of the neighbour, 0 if there is none."""
    d = lattice.d
    place_of_vertex = np.empty(lattice.M, np.int64)
    place_of_vertex[lattice.rows - 1] = np.arange(lattice.M)
    index = {tuple(k): i for i, k in enumerate(lattice.vertex_keys)}
    for u in places:
        key = lattice.vertex_keys[lattice.rows[u] - 1]
        for j in range(d + 1):
            step = np.full(d, -1)
            if j < d:
                step[j] = d
            for side, sign in ((0, 1), (1, -1)):
                v = index.get(tuple(key + sign * step))
                yield u, j, side, 0 if v is None else place_of_vertex[v] + 1


def _unpack(words, low, high, word_of, shift_of):
    keys = np.empty((len(words), len(low)), np.int64)
    for i in range(len(low)):
        bits = max(1, int(high[i] - low[i]).bit_length())
        keys[:, i] = ((words[:, word_of[i]] >> shift_of[i]) & ((1 << bits) - 1)) + low[i]
    return keys


@pytest.mark.parametrize("blocks", [1, 2, 3, 7])
def test_vertices_numbered_in_order_of_first_appearance(blocks):
    """Blocks of corners numbered in tables of their own (which start small and double) and
    merged in order give every vertex the number of its first appearance among all corners,
    for any number of blocks (many vertices per point: spread-out features)."""

    rng = np.random.default_rng(3)
    f = (rng.random((997, 3)) * 40).astype(np.float32)  # ~4 distinct vertices per point
    lattice = P.LatticeCPU(f)
    low, high, word_of, shift_of = lattice._key_fields
    ones = np.zeros(word_of.max() + 1, np.int64)
    wrap = np.zeros(3, np.int64)
    for i in range(3):
        ones[word_of[i]] += 1 << int(shift_of[i])
        wrap[i] = 4 << int(shift_of[i])
    words = np.empty((997 * 4, len(ones)), np.int64)
    bad = np.zeros(1, np.int64)
    P._simplices_cpu(f, P.elevation_scale(3), low, high - low, word_of, shift_of, ones, wrap,
                     words, np.empty((997, 4), np.float32), bad)
    assert bad[0] == 0
    first_seen = {}
    expected = np.array([first_seen.setdefault(tuple(w), len(first_seen)) for w in words])
    assert len(first_seen) > 997  # tables of 16 slots at first had to grow many times
    twice = np.concatenate([words, words ^ 0x5A5A], 1)  # keys of twice as many words
    for recent_bits in (1, 4, B.RECENT_BITS):  # few recent keys: many evicted
        for w in (twice, words):
            M, vertex_words, offsets = P.number_corners(w, blocks, 16, recent_bits)
            assert M == len(first_seen) == lattice.M
            np.testing.assert_array_equal(offsets, expected)
    np.testing.assert_array_equal(offsets, lattice.offsets)
    np.testing.assert_array_equal(vertex_words[:M], np.array(list(first_seen), np.int64))
    # the packed corners unpack to the vertex keys
    np.testing.assert_array_equal(lattice.vertex_keys[lattice.offsets],
                                  _unpack(words, low, high, word_of, shift_of))
    for u, j, side, expected in expected_neighbours(lattice, range(300)):
        assert lattice.neighbours[j, u, side] == expected


@pytest.mark.parametrize("d, scale, shift", [(1, 3.0, -50.0), (3, 1e5, -4e4), (5, 60.0, 7.0)])
def test_packed_corner_keys(d, scale, shift):
    """The corners' keys, packed into words by the simplex step within bounds found from the
    features' ranges (negative and large features too), unpack to lattice points: corner k
    has every coordinate ≡ k (mod d+1), and the barycentric weights rebuild the elevated
    feature from the corners."""

    rng = np.random.default_rng(d)
    f = (rng.random((613, d)) * scale + shift).astype(np.float32)
    lattice = P.LatticeCPU(f)
    keys = lattice.vertex_keys[lattice.offsets].reshape(613, d + 1, d).astype(np.int64)
    for k in range(d + 1):
        assert (keys[:, k] % (d + 1) == k).all()
    full = np.concatenate([keys, -keys.sum(2, keepdims=True)], 2)  # the implicit last one
    s = P.elevation_scale(d).astype(np.float64)
    elevated = np.empty((613, d + 1))
    for j in range(d + 1):  # step 1 in float64
        elevated[:, j] = (f[:, j:] * s[j:]).sum(1) - (j * s[j - 1] * f[:, j - 1] if j else 0)
    rebuilt = np.einsum("nk,nkj->nj", lattice.bary.astype(np.float64), full)
    np.testing.assert_allclose(rebuilt, elevated, atol=1e-6 * scale * (d + 1) + 1e-3)


@pytest.mark.parametrize("d, scale, sorted_order", [(1, 7.0, None), (2, 1.0, False),
                                                     (5, 3.0, True), (4, 1e6, None)])
def test_blur_neighbours_by_merging_sorted_keys(d, scale, sorted_order):
    """Neighbours found by merging the sorted keys equal a dictionary lookup, in both blur
    orders (sorted: scattered 5-D features; buffer order: a pixel grid) and with keys too
    wide to pack into one 62-bit word (several words)."""

    rng = np.random.default_rng(d)
    if d == 2:  # a grid, as the spatial kernel: first appearance is already local
        f = np.stack(np.mgrid[0:37, 0:53], -1).reshape(-1, 2).astype(np.float32) / 1.5
    else:
        f = (rng.random((1501, d)) * scale).astype(np.float32)
    lattice = P.LatticeCPU(f)
    if sorted_order is not None:
        assert lattice.sorted == sorted_order
    assert sorted(lattice.rows) == list(range(1, lattice.M + 1))  # a permutation of the rows
    places = rng.choice(lattice.M, min(lattice.M, 400), replace=False)
    found = 0
    for u, j, side, expected in expected_neighbours(lattice, places):
        assert lattice.neighbours[j, u, side] == expected
        found += expected > 0
    assert found > 0
    if scale == 1e6:  # ranges wider than 62 bits in all: several words
        span = lattice.vertex_keys.max(0).astype(np.int64) - lattice.vertex_keys.min(0)
        assert sum(int(s).bit_length() for s in span) > 62


@pytest.mark.parametrize("shares", [1, 2, 3])
@pytest.mark.parametrize("d, grid, c, dtype", [(1, False, 3, np.float32), (2, True, 21, np.float32),
                                              (2, True, 1, np.float32), (3, False, 5, np.float64),
                                              (5, False, 21, np.float32), (5, True, 1, np.float64)])
def test_blur_in_one_sweep_equals_blur_pass_by_pass(monkeypatch, shares, d, grid, c, dtype):
    """The blur's d+1 passes in one sweep through rings of rows (_blur_fused) give the
    pass-by-pass blur bit for bit, forward and transposed, in both visiting orders (sorted:
    scattered features; buffer order: a grid), with the vertices cut into 1-3 shares (one per
    thread: here as many as asked whatever the machine's cores), each recomputing the places
    of its neighbours' that it needs, and lattices smaller than the rings (the sweep forced
    on)."""
    import numba

    rng = np.random.default_rng(d + c)
    if grid:
        g = np.stack(np.mgrid[0:41, 0:59], -1).reshape(-1, 2).astype(np.float32) / 1.3
        f = g if d == 2 else np.concatenate([g, rng.random((len(g), d - 2)) * 4], 1)
    else:
        f = rng.random((1777, d)) * 9
    lattice = P.LatticeCPU(f.astype(np.float32))
    values = rng.standard_normal((len(f), c)).astype(dtype)
    monkeypatch.setattr(numba, "get_num_threads", lambda: shares)  # the shares _rings makes
    for reverse in (False, True):
        directions = list(range(d, -1, -1) if reverse else range(d + 1))
        results = {}
        for sweep in (False, True):  # pass by pass; one sweep, however small the lattice
            lattice.splat(values)
            results[sweep] = lattice.blur(reverse, sweep=sweep).copy()
        rings = lattice._rings(directions, c, np.dtype(dtype))
        assert rings[3].shape[0] == shares  # the sweep ran, in shares
        np.testing.assert_array_equal(results[True], results[False])
    if not grid and d == 5:  # scattered 5-D features: the sorted order, as the CRF's
        assert lattice.sorted


@pytest.mark.parametrize("shares", [1, 2, 3])
@pytest.mark.parametrize("H, W, scale, c", [(41, 59, 1.0, 21), (23, 37, 2.7, 5), (1, 97, 1.0, 3),
                                            (61, 1, 0.6, 2), (7, 9, 0.3, 8)])
def test_filter_in_one_sweep_equals_splat_blur_slice(monkeypatch, shares, H, W, scale, c):
    """LatticeCPU.stream (splat, blur and slice in one sweep through rings, _filter_streamed)
    gives the three steps' result bit for bit, on pixel grids of odd sizes, single rows and
    columns, with per-point factors, a base, accumulating into out, and the softmax: each share
    (one per thread: here as many as asked) recomputes the vertices its points need in point
    order, so the sums are those of one thread's splat — whatever the number of shares."""
    import numba

    rng = np.random.default_rng(H * W + c)
    f = np.stack(np.mgrid[0:H, 0:W], -1).reshape(-1, 2).astype(np.float32) / scale
    N = len(f)
    lattice = P.LatticeCPU(f)
    assert not lattice.sorted
    values = rng.standard_normal((N, c)).astype(np.float32)
    pre, post = rng.random(N).astype(np.float32), rng.random(N).astype(np.float32)
    base = rng.standard_normal((N, c)).astype(np.float32)
    monkeypatch.setattr(numba, "get_num_threads", lambda: 1)  # the reference: one point block
    lattice.splat(values, pre)
    blurred = lattice.blur()
    expected = {"plain": lattice.slice(blurred),
                "factors": lattice.slice(blurred, post, out=np.empty_like(values), base=base),
                "accumulate": lattice.slice(blurred, post, out=base.copy()),
                "softmax": lattice.slice(blurred, post, out=np.empty_like(values), base=base,
                                         softmax=True)}
    monkeypatch.setattr(numba, "get_num_threads", lambda: shares)
    assert lattice._stream_plan(c) is not None  # (stream runs however small the lattice)
    got = {"plain": lattice.stream(values, pre),
           "factors": lattice.stream(values, pre, post, out=np.empty_like(values), base=base),
           "accumulate": lattice.stream(values, pre, post, out=base.copy()),
           "softmax": lattice.stream(values, pre, post, out=np.empty_like(values), base=base,
                                     softmax=True)}
    assert lattice._stream_plan(c)[-1].shape[0] == shares  # the sweep ran, in shares
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    # filter takes the sweep when asked, the transposed filter too (the blur's directions in
    # reverse order: rings of their own)
    np.testing.assert_array_equal(lattice.filter(values, pre=pre, schedule="stream"),
                                  expected["plain"])
    reverse = lattice.filter(values, reverse=True, pre=pre, post=post, schedule="stream")
    assert lattice._stream_plan(c, True) is not None
    monkeypatch.setattr(numba, "get_num_threads", lambda: 1)
    lattice.splat(values, pre)
    np.testing.assert_array_equal(reverse, lattice.slice(lattice.blur(True), post))


@pytest.mark.parametrize("H, W, scale", [(37, 41, 2.5), (29, 33, 0.8), (1, 30, 1.0), (30, 1, 0.7)])
def test_stream_tables_against_their_definitions(H, W, scale):
    """_stream_tables' sweeps against the definitions, by NumPy: top/bottom the running max/min
    of each point's highest/lowest vertex, first[v] the first point with a corner at v,
    complete[v] one past the last point with a corner at a vertex ≤ v."""

    f = np.stack(np.mgrid[0:H, 0:W], -1).reshape(-1, 2).astype(np.float32) / scale
    lattice = P.LatticeCPU(f)
    N, M = lattice.N, lattice.M
    corners = lattice.offsets.reshape(N, -1).astype(np.int64)
    top, bottom = np.empty(N, np.int64), np.empty(N, np.int64)
    first, complete = np.empty(M, np.int64), np.empty(M, np.int64)
    P._stream_tables_cpu(lattice.offsets, M, top, bottom, first, complete)
    point = np.repeat(np.arange(N), corners.shape[1])
    first_point, last_point = np.full(M, N), np.zeros(M, np.int64)
    np.minimum.at(first_point, corners.ravel(), point)
    np.maximum.at(last_point, corners.ravel(), point)
    np.testing.assert_array_equal(top, np.maximum.accumulate(corners.max(1)))
    np.testing.assert_array_equal(bottom, np.minimum.accumulate(corners.min(1)[::-1])[::-1])
    np.testing.assert_array_equal(first, first_point)
    np.testing.assert_array_equal(complete, np.maximum.accumulate(last_point) + 1)


def test_filter_in_one_sweep_checks_its_arguments_and_rings(monkeypatch):
    """stream refuses what it cannot do (a lattice in sorted order, out in the values' memory);
    its rings are sized by a run of the schedule, and a ring too small is caught."""

    rng = np.random.default_rng(2)
    monkeypatch.setattr(P, "STREAM_BYTES", 0)  # the size rule says yes to any buffer
    scattered = P.LatticeCPU((rng.random((3000, 5)) * 9).astype(np.float32))
    assert scattered.sorted and not scattered.streams(4)
    with pytest.raises(ValueError, match="does not stream"):
        scattered.stream(np.ones((3000, 4), np.float32))
    grid = P.LatticeCPU(np.stack(np.mgrid[0:30, 0:40], -1).reshape(-1, 2).astype(np.float32))
    values = rng.random((1200, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="out must not share memory"):
        grid.stream(values, out=values)
    assert not grid.streams(1)  # the kernel normalisation stays with splat, blur, slice
    monkeypatch.setattr(P, "STREAM_BYTES", 4 << 20)  # only vertex buffers over STREAM_BYTES
    assert not grid.streams(4) and not P.stream_pays(grid.M, 4)
    assert P.stream_pays((4 << 20) // 16 + 1, 4)
    np.testing.assert_array_equal(grid.stream(values), grid.filter(values, schedule="stream"))
    tables, reach, directions, masks, bases, rings = grid._stream_plan(4)
    masks[0] = masks[0] // 4  # the splat's ring a quarter of what the schedule needs
    with pytest.raises(RuntimeError, match="overflowed"):
        grid.stream(values)


@pytest.mark.parametrize("span", [5, 3000, 2**29])
def test_packed_keys_radix_sort_as_lexsort(span):
    """Keys packed as key_layout says, sorted by _radix_argsort, come in NumPy's stable
    lexicographic order, for keys that pack into one word and for keys that need several (span
    2^29: 30 bits per coordinate)."""

    rng = np.random.default_rng(span % 97)
    keys = rng.integers(-span, span, (4001, 5)).astype(np.int32)
    keys[2000:2500] = keys[:500]  # duplicates: their order must stay as given (stable)
    low, high = keys.min(0).astype(np.int64) - 5, keys.max(0).astype(np.int64) + 5
    word_of, shift_of, W = P.key_layout(low, high)
    assert W == (1 if span < 2**10 else 2 if span < 2**20 else 3)
    words = np.zeros((len(keys), W), np.int64)
    for i in range(5):
        words[:, word_of[i]] |= (keys[:, i] - low[i]) << shift_of[i]
    for blocks in (1, 2, 3):  # in parallel over blocks of entries: the same stable order
        np.testing.assert_array_equal(P._radix_argsort_cpu(words, blocks),
                                      np.lexsort(keys.T[::-1]))


@pytest.mark.parametrize("blocks", [1, 2, 3, 7])
@pytest.mark.parametrize("grid", [False, True])
def test_splat_by_scatter_equals_splat_by_gather(blocks, grid):
    """The two splat kernels (point blocks that share only a band of rows; per-vertex
    gather) give the same vertex sums, for 1-7 blocks, on scattered features (wide bands)
    and a pixel grid (narrow bands)."""

    rng = np.random.default_rng(4)
    if grid:
        f = np.stack(np.mgrid[0:29, 0:69], -1).reshape(-1, 2).astype(np.float32) / 2.5
    else:
        f = (rng.random((2001, 5)) * [20, 20, 2, 2, 2]).astype(np.float32)
    N = f.shape[0]
    v, pre = rng.random((N, 3)).astype(np.float32), rng.random(N).astype(np.float32)
    lattice = P.LatticeCPU(f)
    gathered = np.zeros((lattice.M + 1, 3), np.float32)
    starts, members = lattice.members_by_vertex()
    P._splat_gather_cpu(v, pre, lattice.bary, starts, members, gathered)
    low, ends, start = P.scatter_plan(lattice.offsets, lattice.d + 1, lattice.M, blocks)
    assert ends[0] == 0 and ends[-1] == lattice.M and (np.diff(ends) >= 0).all()
    if grid and blocks > 1:  # neighbouring blocks share about a row of the image
        assert 0 < start[-1] < 3 * 69 * (blocks - 1)
    rows = np.full((lattice.M + 1 + start[-1], 3), np.nan, np.float32)  # buffer, private rows
    rows[0] = 0
    P._splat_scatter_cpu(v, pre, lattice.bary, lattice.offsets, low, ends, start, rows,
                         blocks % 2 == 1)  # with and without prefetching
    np.testing.assert_allclose(rows[1: lattice.M + 1], gathered[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d, sorted_order", [(2, False), (5, True)])
def test_simd_rows_equal_one_channel_at_a_time(dtype, d, sorted_order):
    """Rows of 8 channels or more go through the 8-wide row operations (the columns after
    the whole 8-wide steps in 4-, 2- and 1-wide steps; rows of more than four whole steps in
    a loop), fewer through plain loops: every channel of a 21-, 13-, 8-, 15-, 10- or
    41-channel filter (splat, blur in either order, slice from a base and accumulating,
    transposed too) equals that channel filtered alone, to the last bit."""

    rng = np.random.default_rng(d)
    if d == 2:
        f = np.stack(np.mgrid[0:23, 0:31], -1).reshape(-1, 2).astype(np.float32) / 1.3
    else:
        f = (rng.random((701, 5)) * 4).astype(np.float32)
    lattice = P.LatticeCPU(f)
    assert lattice.sorted == sorted_order
    N = len(f)
    pre, post = rng.random(N) + 0.5, rng.random(N) + 0.5
    for c in (21, 13, 8, 15, 10, 41):
        v = rng.random((N, c)).astype(dtype)
        base = rng.random((N, c)).astype(dtype)
        for reverse in (False, True):
            together = lattice.filter(v, reverse, pre, post, np.zeros_like(v), base)
            again = lattice.filter(v, reverse, pre, post, together.copy())  # accumulate
            for k in range(c):
                alone = lattice.filter(v[:, k:k + 1], reverse, pre, post,
                                       np.zeros((N, 1), dtype), base[:, k:k + 1])
                np.testing.assert_array_equal(together[:, k], alone[:, 0])
                more = lattice.filter(v[:, k:k + 1], reverse, pre, post, alone.copy())
                np.testing.assert_array_equal(again[:, k], more[:, 0])


@pytest.mark.parametrize("c, dtype, limit, together", [
    (21, np.float32, None, True), (8, np.float32, None, True), (1, np.float32, None, False),
    (21, np.float64, None, False), (21, np.float32, 0, False)])
def test_two_lattices_splat_together_as_apart(monkeypatch, c, dtype, limit, together):
    """splat_together (the CRF's two kernels splatting in one pass over Q) fills each
    lattice's buffer exactly as its own splat does, to the bit — in one pass where it can
    (float32 rows of several channels, buffers within SPLAT_TOGETHER_BYTES), one lattice
    after the other otherwise."""

    rng = np.random.default_rng(c)
    H, W = 29, 37
    image, _ = synthetic_scene(H, W, 2, seed=c)
    grid = np.stack(np.mgrid[0:H, 0:W][::-1], -1).reshape(-1, 2).astype(np.float32)
    colours = image.reshape(-1, 3).astype(np.float32)
    features = [grid / 3, np.concatenate([grid / 20, colours / 13], 1)]
    values = rng.random((H * W, c)).astype(dtype)
    pres = [rng.random(H * W).astype(dtype) + 0.5, None]
    if limit is not None:  # the size rule says no
        monkeypatch.setattr(P, "SPLAT_TOGETHER_BYTES", limit)
    calls = []
    fused = P._splat_scatter_two_cpu
    monkeypatch.setattr(P, "_splat_scatter_two_cpu", lambda *a: calls.append(1) or fused(*a))
    apart = [P.LatticeCPU(f) for f in features]
    for lattice, pre in zip(apart, pres):
        lattice.splat(values, pre)
    both = [P.LatticeCPU(f) for f in features]
    for lattice in both:  # stale numbers in the buffers: the splat must overwrite all of them
        for array in lattice._work_buffers(c, np.dtype(dtype))[:2]:
            array[1:] = np.nan
    P.splat_together(both, values, pres)
    assert len(calls) == int(together)
    for a, b in zip(apart, both):
        np.testing.assert_array_equal(a._splatted[0], b._splatted[0])
        np.testing.assert_array_equal(a.slice(a.blur()), b.slice(b.blur()))
