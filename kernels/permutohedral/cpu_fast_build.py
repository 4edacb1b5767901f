"""Fast CPU lattice, part 1: building it (steps 1-3, the vertex numbering, the blur neighbours).

The same lattice as ``reference`` (equal bit for bit: simplices, weights, vertex numbers), built
for speed: steps 1-3 a block of points at a time so the compiler vectorises over points; vertex
keys packed into 64-bit words (``key_layout``: one word for images) and deduplicated by hash
tables, one per block of corners, merged in order so that vertices are still numbered in order
of first appearance; blur neighbours by merging the radix-sorted keys with themselves shifted by
one lattice step (sequential reads where one hash lookup per neighbour was a cache miss).
Coordinates take as many bits as their range needs (up to 31: features up to ~10^8 / d), so
they cannot overflow — pydensecrf's 16-bit keys wrap for large images with small widths.
"""
import numba
import numpy as np
from numba import njit, prange

from .. import parallel_njit

EMPTY = -1
# Indices in the hot loops are unsigned (np.uint64) where it pays: an index Numba cannot prove
# ≥ 0 — one read from an array, like a vertex row — is first tested for being negative and
# wrapped around (Python's a[-1]), a compare and an add per access; unsigned ones it uses as
# they are.  (Mixing uint64 and int64 in one expression gives float64 in Numba: every term
# of an index expression is converted.)
_u = np.uint64


# ---- steps 1-3, a block of points at a time ---------------------------------------------
SIMPLEX_BLOCK = 64  # points per block in the simplex step


def _simplices(features, scale, low, span, word_of, shift_of, ones, wrap, words, bary, bad):
    # features (N, d) float32 -> words (N·(d+1), W) int64: the d coordinates of each simplex
    # corner, packed as key_layout says (coordinate i as key − low[i] ∈ [0, span[i]] at bit
    # shift_of[i] of word word_of[i]), and bary (N, d+1).  bad[0] is set if a coordinate
    # falls outside its field (key_bounds was wrong: a bug, never a wrong answer).  ones[w]:
    # 1 in every field of word w; wrap[i]: d+1 in the field of coordinate i.
    #
    # Steps 1-3 for a block of points at a time, every quantity stored point-minor (row i of
    # ``rank`` holds rank[i] of each point of the block) and every loop innermost over the
    # points, without branches: the compiler runs 8 points per SIMD instruction.  (One point
    # at a time, the loops over d+1 coordinates are too short to vectorise.)
    N, d = features.shape
    W = words.shape[1]
    f32 = np.float32
    down, up = f32(1.0) / f32(d + 1), f32(d + 1)
    B = SIMPLEX_BLOCK
    for blk in prange((N + B - 1) // B):
        n0 = blk * B
        m = min(B, N - n0)
        f = np.empty((d, B), dtype=np.float32)
        elevated = np.empty((d + 1, B), dtype=np.float32)
        rem0 = np.empty((d + 1, B), dtype=np.float32)
        diff = np.empty((d + 1, B), dtype=np.float32)
        rank = np.empty((d + 1, B), dtype=np.int32)
        b = np.zeros((d + 2, B), dtype=np.float32)
        v = np.empty(B, dtype=np.float32)
        sm = np.zeros(B, dtype=np.float32)
        total = np.zeros(B, dtype=np.int32)
        word = np.empty(B, dtype=np.int64)
        corner = np.empty((d + 1, B), dtype=np.int64)
        outside = np.zeros(B, dtype=np.int32)
        for p in range(m):
            for j in range(d):
                f[j, p] = features[n0 + p, j]
        # 1. elevate onto the hyperplane
        for j in range(d, 0, -1):
            s = scale[j - 1]
            for p in range(m):
                cf = f[j - 1, p] * s
                elevated[j, p] = sm[p] - f32(j) * cf
                sm[p] += cf
        for p in range(m):
            elevated[0, p] = sm[p]
        # 2. the remainder-0 point: each coordinate rounded to a multiple of d+1 as densecrf's
        # x86 build rounds (SSE: ties to even — a half-way r that is odd becomes r − 1), in
        # float64 (exact for a float32 x); then the ranks of the differences
        for i in range(d + 1):
            for p in range(m):
                x = down * elevated[i, p]
                r = np.floor(np.float64(x) + 0.5)
                odd = r - 2.0 * np.floor(r * 0.5)
                r -= odd * ((r - x) == 0.5)
                rem0[i, p] = f32(r) * up
                diff[i, p] = elevated[i, p] - rem0[i, p]
                total[p] += np.int32(r)
        for i in range(d + 1):
            # rank[i]: how many coordinates lie further above their remainder-0 point (ties:
            # those before i), plus the coordinate sum that step 2 must undo
            for p in range(m):
                rank[i, p] = total[p]
            for j in range(i):
                for p in range(m):
                    rank[i, p] += diff[j, p] >= diff[i, p]
            for j in range(i + 1, d + 1):
                for p in range(m):
                    rank[i, p] += diff[j, p] > diff[i, p]
        for i in range(d + 1):  # back onto the plane Σ x = 0
            for p in range(m):
                r = rank[i, p]
                move = np.int32(r < 0) - np.int32(r > d)
                rank[i, p] = r + (d + 1) * move
                rem0[i, p] += up * f32(move)
        # 3. barycentric weights: b[d − rank[i]] += v_i, b[d − rank[i] + 1] −= v_i (added
        # through comparisons: ± 0 elsewhere, which leaves the sums as they are)
        for i in range(d + 1):
            for p in range(m):
                v[p] = (elevated[i, p] - rem0[i, p]) * down
            for k in range(d + 2):
                for p in range(m):
                    b[k, p] += v[p] * f32(rank[i, p] == d - k) - v[p] * f32(rank[i, p] == d - k + 1)
        for p in range(m):
            b[0, p] += f32(1.0) + b[d + 1, p]  # float32, as densecrf's SSE build
            for k in range(d + 1):
                bary[n0 + p, k] = b[k, p]
        # the corners' packed keys: corner 0 is rem0 + (0, .., 0); corner k+1 is corner k
        # + 1 in every coordinate and − (d+1) in the one of rank d − k (canonical_simplex)
        for w in range(W):
            for p in range(m):
                word[p] = 0
            for i in range(d):
                if word_of[i] == w:
                    for p in range(m):
                        field = np.int64(np.int32(rem0[i, p])) - low[i]
                        outside[p] |= (field < d) | (field > span[i] - d)
                        word[p] += field << shift_of[i]
            for k in range(d + 1):
                for p in range(m):
                    corner[k, p] = word[p]
                    word[p] += ones[w]
                for i in range(d):
                    if word_of[i] == w:
                        for p in range(m):
                            word[p] -= wrap[i] & -np.int64(rank[i, p] == d - k)  # no branch
            for p in range(m):
                for k in range(d + 1):
                    words[(n0 + p) * (d + 1) + k, w] = corner[k, p]
        for p in range(m):
            if outside[p]:
                bad[0] = 1


def key_bounds(features, scale):
    """(low, high): int64 bounds of every vertex key coordinate the features can produce, and
    of their blur neighbours, from the range of each feature (interval arithmetic on step 1:
    elevated[j] = Σ_{i ≥ j} s_i f_i − j s_{j−1} f_{j−1}).  A corner's coordinate is the
    elevated one rounded to a multiple of d+1, moved by at most d+1 back onto the plane and by
    the canonical offset (≤ d); a blur step moves it by ≤ d more; the float32 arithmetic
    by a few units at most — all inside the slack."""
    N, d = features.shape
    fmin = np.empty(d, dtype=np.float64)
    fmax = np.empty(d, dtype=np.float64)
    _key_ranges_cpu(features, fmin, fmax)
    s = scale.astype(np.float64)
    lo_terms, hi_terms = s * fmin, s * fmax  # s > 0
    lo, hi = np.empty(d), np.empty(d)
    for j in range(d):
        lo[j], hi[j] = lo_terms[j:].sum(), hi_terms[j:].sum()
        if j > 0:
            lo[j] -= j * hi_terms[j - 1]
            hi[j] -= j * lo_terms[j - 1]
    slack = 4 * (d + 1) + 2 + np.ceil(np.maximum(abs(lo), abs(hi)) * d * 2.0**-20)
    return (np.floor(lo) - slack).astype(np.int64), (np.ceil(hi) + slack).astype(np.int64)


# ---- distinct vertices by hash tables, one per block of corners -----------------------------
# The N·(d+1) simplex corners name far fewer distinct vertices.  Each thread numbers the distinct
# keys of its own contiguous block of corners in a table of its own, in order of first
# appearance; then the blocks are merged in order: a vertex an earlier block has seen keeps that
# block's number, the others get the next free ones.  So the vertices are numbered in order of
# first appearance over all corners, whatever the number of threads (neighbouring pixels get
# neighbouring rows, which splat and slice want).  Tables start small and double whenever they
# are half full: one sized for the worst case (every point its own d+1 vertices) would be many
# times too large and every probe a cache miss.  Even so a table of 10^5 vertices is larger than the
# L2 cache, and a probe there waits for the L3; but a vertex comes back soon (the next pixel,
# the next image row), so a small table of recently seen keys in front of it (2^RECENT_BITS slots,
# one key each, a new key evicting the old: 192 KB, L2) answers most lookups.
RECENT_BITS = 14


def _hash(words, e):
    # 64 mixed bits of the packed key words[e]: a multiplication by a large odd constant
    # carries every key bit into the high half, the xor folds the high half back into the low
    # one, where the table slot is taken from.  Row e is read in place: a view words[e] per key
    # would cost two atomic reference-count updates, more than the probe.
    h = np.uint64(0)
    for w in range(words.shape[1]):
        h = (h ^ np.uint64(words[e, w])) * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(32)
    return h


def _same_key(a, i, b, j):
    """Whether row i of a and row j of b (packed keys, read in place) are equal."""
    for w in range(a.shape[1]):
        if a[i, w] != b[j, w]:
            return False
    return True


def _number_keys(words, e0, e1, table, keys, M, index, recent_keys, recent, recent_bits):
    # index[e] for e in e0..e1−1: the number of key words[e] among the distinct keys, new
    # keys numbered M, M+1, .. in order of first appearance; keys[m]: key m; table: slots
    # holding the numbers of the M keys seen so far (EMPTY if free); recent[i] (EMPTY if
    # none) the number of key recent_keys[i], a recently seen key whose hash has i in its
    # top recent_bits bits.  Returns (M, the table, grown or not).
    W = words.shape[1]
    shift = np.uint64(64 - recent_bits)
    for e in range(e0, e1):
        h = _hash(words, e)
        i = h >> shift
        v = recent[i]
        if v != EMPTY and _same_key(recent_keys, i, words, e):
            index[e] = v
            continue
        if 2 * (M + 1) > table.shape[0]:
            table = _grow(table, keys, M)
        mask = np.uint64(table.shape[0] - 1)
        slot = h & mask
        while True:
            v = table[slot]
            if v == EMPTY:  # a new key
                table[slot] = M
                for w in range(W):
                    keys[M, w] = words[e, w]
                v = M
                M += 1
                break
            if _same_key(keys, v, words, e):
                break
            slot = (slot + np.uint64(1)) & mask
        index[e] = v
        recent[i] = v
        for w in range(W):
            recent_keys[i, w] = words[e, w]
    return M, table


def _grow(table, keys, M):
    # a table twice the size holding keys 0..M-1 (no duplicates, so no key comparisons)
    bigger = np.full(2 * table.shape[0], EMPTY, dtype=table.dtype)
    mask = np.uint64(bigger.shape[0] - 1)
    for v in range(M):
        slot = _hash(keys, v) & mask
        while bigger[slot] != EMPTY:
            slot = (slot + np.uint64(1)) & mask
        bigger[slot] = v
    return bigger


def _number_blocks(words, table_size, recent_bits, block_keys, counts, local, tables, sizes):
    # block b = corners b·K/B .. (b+1)·K/B − 1: local[e] its vertex among the block's own
    # counts[b] distinct keys block_keys[b, :counts[b]]; its final table is kept in
    # tables[b, :sizes[b]] for the merge
    B, K = counts.shape[0], words.shape[0]
    for b in prange(B):
        table = np.full(table_size, EMPTY, dtype=np.int32)
        recent = np.full(1 << recent_bits, EMPTY, dtype=np.int32)
        recent_keys = np.empty((1 << recent_bits, words.shape[1]), dtype=np.int64)
        counts[b], table = _number_keys(words, b * K // B, (b + 1) * K // B, table,
                                        block_keys[b], 0, local, recent_keys, recent,
                                        recent_bits)
        sizes[b] = table.shape[0]
        for i in range(table.shape[0]):
            tables[b, i] = table[i]


def _find(keys, row, tables, a, size, key_rows, base):
    # the number of key keys[row] among block a's keys (key_rows[base + v], found through
    # its table tables[a, :size]), or −1
    mask = np.uint64(size - 1)
    slot = _hash(keys, row) & mask
    while True:
        v = tables[a, slot]
        if v == EMPTY:
            return -1
        if _same_key(key_rows, base + v, keys, row):
            return v
        slot = (slot + np.uint64(1)) & mask


def _merge_blocks(block_keys, counts, tables, sizes, number, vertex_words):
    # number[b, m]: the global number of vertex m of block b, the blocks taken in order;
    # vertex_words: the keys of the global vertices.  Returns M.  Block 0's vertices keep
    # their numbers; each later block looks its keys up in the tables of the blocks before
    # it (in parallel: the tables are only read), then numbers the ones none of them holds
    # in its own order (they are distinct within a block).
    B, S = block_keys.shape[0], block_keys.shape[1]
    keys = block_keys.reshape(B * S, block_keys.shape[2])  # row b·S + m: key m of block b
    for m in prange(counts[0]):
        number[0, m] = m
        for w in range(keys.shape[1]):
            vertex_words[m, w] = keys[m, w]
    M = counts[0]
    for b in range(1, B):
        for m in prange(counts[b]):
            number[b, m] = -1
            for a in range(b):
                v = _find(keys, b * S + m, tables, a, sizes[a], keys, a * S)
                if v >= 0:
                    number[b, m] = number[a, v]
                    break
        for m in range(counts[b]):
            if number[b, m] < 0:
                number[b, m] = M
                for w in range(keys.shape[1]):
                    vertex_words[M, w] = keys[b * S + m, w]
                M += 1
    return M


def _global_offsets(local, number, offsets):
    B, K = number.shape[0], local.shape[0]
    for b in prange(B):
        for e in range(b * K // B, (b + 1) * K // B):
            offsets[e] = number[b, local[e]]


def number_corners(words, B, table_size, recent_bits=RECENT_BITS):
    """(M, vertex_words, offsets): the M distinct keys among the rows of ``words`` (K, W),
    numbered in order of first appearance, and the number of each row's key — hashed in B
    blocks of rows, tables starting at table_size slots, 2^recent_bits recent keys."""
    K, W = words.shape
    S = (K + B - 1) // B  # rows per block, at most
    block_keys = np.empty((B, S, W), dtype=np.int64)
    counts = np.zeros(B, dtype=np.int64)
    local = np.empty(K, dtype=np.int32)
    # a table doubles when half full, so it ends below 4 (rows + 1) slots (np.empty: pages
    # never written cost nothing)
    tables = np.empty((B, max(table_size, 1 << int(np.ceil(np.log2(2 * (S + 1)))))), np.int32)
    sizes = np.empty(B, dtype=np.int64)
    _number_blocks_cpu(words, table_size, recent_bits, block_keys, counts, local, tables, sizes)
    number = np.empty((B, int(counts.max())), dtype=np.int32)
    vertex_words = np.empty((int(counts.sum()), W), dtype=np.int64)
    M = _merge_blocks_cpu(block_keys, counts, tables, sizes, number, vertex_words)
    offsets = np.empty(K, dtype=np.int32)
    _global_offsets_cpu(local, number, offsets)
    return M, vertex_words[:M].copy(), offsets


# ---- the vertices in sorted order (for the blur neighbours) --------------------------------
RADIX_BITS = 11  # 2048 buckets: the counts stay in the L1 cache


def key_layout(low, high):
    """How to pack key coordinates with low[i] ≤ key[i] ≤ high[i] into as few int64 words as
    the ranges allow (one for images: ranges of a few thousand), coordinate 0 in the highest
    bits of word 0, so that sorting the rows of words sorts the keys lexicographically and a
    step added to every coordinate is a step added to the words.  Coordinate i is stored as
    key − low[i] at bit shift_of[i] of word word_of[i].  Returns (word_of, shift_of, W)."""
    bits = [max(1, int(span).bit_length()) for span in np.asarray(high) - np.asarray(low)]
    groups = [[]]  # the coordinates of each word
    for i, b in enumerate(bits):
        if sum(bits[k] for k in groups[-1]) + b > 63:
            groups.append([])
        groups[-1].append(i)
    word_of = np.empty(len(bits), np.int64)
    shift_of = np.empty(len(bits), np.int64)
    for w, group in enumerate(groups):
        shift = 0
        for i in reversed(group):
            word_of[i], shift_of[i] = w, shift
            shift += bits[i]
    return word_of, shift_of, len(groups)


def _key_ranges(keys, low, high):
    # per column, in one pass over the rows (NumPy's min(axis=0) on a tall, narrow array
    # makes a strided pass per column)
    low[:] = keys[0]
    high[:] = keys[0]
    for e in range(keys.shape[0]):
        for i in range(keys.shape[1]):
            low[i] = min(low[i], keys[e, i])
            high[i] = max(high[i], keys[e, i])


def _radix_argsort(words, blocks):
    # The stable order that sorts the rows of words (K, W) int64 ≥ 0: least significant digit
    # first, RADIX_BITS per pass, the last word first.  A pass in which every entry has the
    # same digit is skipped.  Each pass in parallel over ``blocks`` contiguous blocks of
    # entries: every block counts its digits, then (from all the counts) block t's entries of
    # digit g go after those of the smaller digits and after the earlier blocks' entries of
    # digit g — each block writes its own slots, in its own order: the sort stays stable.
    K, W = words.shape
    radix = 1 << RADIX_BITS
    B = max(1, min(blocks, K))
    perm = np.arange(K).astype(np.int32)
    perm_next = np.empty(K, dtype=np.int32)
    key = np.empty(K, dtype=np.int64)
    key_next = np.empty(K, dtype=np.int64)
    count = np.empty((B, radix), dtype=np.int64)
    top = np.zeros(B, dtype=np.int64)
    for w in range(W - 1, -1, -1):
        for t in prange(B):
            top[t] = 0
            for i in range(t * K // B, (t + 1) * K // B):
                key[i] = words[perm[i], w]
                top[t] = max(top[t], key[i])
        shift = 0
        while (top.max() >> shift) > 0:
            for t in prange(B):
                count[t] = 0
                for i in range(t * K // B, (t + 1) * K // B):
                    count[t, (key[i] >> shift) & (radix - 1)] += 1
            if count.sum(axis=0).max() < K:
                slot = 0
                for g in range(radix):  # count[t, g] becomes block t's first slot of digit g
                    for t in range(B):
                        slot, count[t, g] = slot + count[t, g], slot
                for t in prange(B):
                    for i in range(t * K // B, (t + 1) * K // B):
                        digit = (key[i] >> shift) & (radix - 1)
                        at = count[t, digit]
                        count[t, digit] = at + 1
                        perm_next[at] = perm[i]
                        key_next[at] = key[i]
                perm, perm_next = perm_next, perm
                key, key_next = key_next, key
            shift += RADIX_BITS
    return perm


# ---- blur neighbours by merging sorted keys -------------------------------------------------
def _compare_step(words, w, u, step):
    """−1, 0, 1 as the key packed in words[w] is lexicographically below, equal to, above the
    key of words[u] moved by one lattice step (packed: ``step``, added word by word)."""
    for i in range(words.shape[1]):
        target = words[u, i] + step[i]
        if words[w, i] != target:
            return -1 if words[w, i] < target else 1
    return 0


def _merge_neighbours(sorted_words, steps, neighbours):
    # neighbours (d+1, M, 2), zero on entry: 1 + sorted index of the vertex one step forward
    # (side 0: key + step_j) / back (side 1: key − step_j) along direction j, 0 = no vertex.
    # step_j is −1 in every coordinate but +d in coordinate j (none for j = d: that
    # coordinate is the implicit last one).  Adding step_j to every key keeps them sorted, so
    # for each direction one merge of the sorted keys with themselves finds every neighbour
    # pair: O(M) sequential reads, no hash lookups.  The keys are packed (key_layout, with
    # room for a step: key_bounds), so a step is an addition per word and comparing compares
    # int64s; the d+1 directions are independent (one thread each).
    M = sorted_words.shape[0]
    for j in prange(neighbours.shape[0]):
        if sorted_words.shape[1] == 1:  # one word per key (images): plain int64 compares
            step = steps[j, 0]
            w = _u(0)
            for u in range(_u(M)):
                target = sorted_words[u, 0] + step
                while w < _u(M) and sorted_words[w, 0] < target:
                    w += _u(1)
                if w == _u(M):
                    break
                if sorted_words[w, 0] == target:
                    neighbours[j, u, 0] = w + _u(1)
                    neighbours[j, w, 1] = u + _u(1)
            continue
        step = steps[j]
        w = 0
        for u in range(M):
            while w < M and _compare_step(sorted_words, w, u, step) < 0:
                w += 1
            if w == M:
                break
            if _compare_step(sorted_words, w, u, step) == 0:
                neighbours[j, u, 0] = w + 1
                neighbours[j, w, 1] = u + 1


def _to_buffer_order(sorted_neighbours, order, buffer_rows, out):
    # out[j, order[u]] = buffer_rows[sorted_neighbours[j, u]]: neighbours by buffer row
    for u in prange(order.shape[0]):
        for j in range(sorted_neighbours.shape[0]):
            for side in range(2):
                out[j, order[u], side] = buffer_rows[sorted_neighbours[j, u, side]]


def _mean_step(neighbours, rows):
    """Mean distance between a vertex and its blur neighbours, over every 16th vertex: in
    places (rows None) or in the buffer rows ``rows`` (indexed by 1 + place)."""
    total, count = 0, 0
    for j in range(neighbours.shape[0]):
        for u in range(0, neighbours.shape[1], 16):
            for side in range(2):
                w = neighbours[j, u, side]
                if w > 0:
                    total += abs(w - (u + 1)) if rows is None else abs(rows[w] - rows[u + 1])
                    count += 1
    return total / max(count, 1)


def _reach(neighbours, out):
    # out[j]: the largest |w − 1 − u| over the neighbours w = neighbours[j, u, side] > 0
    # (blocks of vertices in parallel, each without branches; then the blocks' maxima)
    D, M = neighbours.shape[0], neighbours.shape[1]
    B = 64
    far = np.zeros((B, D), np.int64)
    for b in prange(B):
        for j in range(D):
            f = 0
            for u in range(b * M // B, (b + 1) * M // B):
                for side in range(2):
                    w = np.int64(neighbours[j, u, side])
                    f = max(f, abs(w - 1 - u) * (w > 0))
            far[b, j] = f
    for j in range(D):
        out[j] = far[:, j].max()


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


_hash = njit(inline="always", cache=True)(_hash)
_same_key = njit(inline="always", cache=True)(_same_key)
_simplices_cpu = parallel_njit(_simplices)
_grow = njit(cache=True)(_grow)
_number_keys = njit(cache=True)(_number_keys)
_number_blocks_cpu = parallel_njit(_number_blocks)
_find = njit(inline="always", cache=True)(_find)
_merge_blocks_cpu = parallel_njit(_merge_blocks)
_global_offsets_cpu = parallel_njit(_global_offsets)
_key_ranges_cpu = njit(cache=True)(_key_ranges)
_radix_argsort_cpu = parallel_njit(_radix_argsort)
radix_argsort = _radix_argsort_cpu  # (words (K, W) int64 ≥ 0, blocks) -> the stable order
_compare_step = njit(inline="always", cache=True)(_compare_step)
_merge_neighbours_cpu = parallel_njit(_merge_neighbours)
_mean_step = njit(cache=True)(_mean_step)
_to_buffer_order_cpu = parallel_njit(_to_buffer_order)
_reach_cpu = parallel_njit(_reach)
_group_by_vertex_cpu = njit(cache=True)(_group_by_vertex)
