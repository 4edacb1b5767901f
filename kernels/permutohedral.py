"""Gaussian filtering in d dimensions on the permutohedral lattice (Adams, Baek & Davis 2010).

We want, for N points with features f_i ∈ ℝ^d (already divided by the kernel widths) and values
v_i ∈ ℝ^c, the Gaussian filter   out_i = Σ_j exp(−|f_i − f_j|² / 2) · v_j   (self included),
in O(N·d²) instead of O(N²).  The permutohedral lattice A*_d tiles the hyperplane
H_d = {x ∈ ℝ^(d+1) : Σ x = 0} with simplices whose vertices are integer points with all
coordinates congruent mod d+1 ("remainder-k" points).

1. **Elevate** (§3.1): f ↦ E f ∈ H_d, scaled so that the blur below has the right variance:
   elevated[j] = Σ_{i ≥ j} s_i f_i − j · s_{j−1} f_{j−1},  s_i = √(2/3)·(d+1)/√((i+1)(i+2)).
2. **Enclosing simplex** (§3.1): round every coordinate to the nearest multiple of d+1 (the
   remainder-0 point), sort the differences (their *rank*), and fix the coordinate sum back to 0.
   The d+1 vertices of the simplex are  rem0 + canonical[k][rank],  k = 0..d.
3. **Barycentric weights** of the point in that simplex, from the sorted differences.
4. **Splat**: every vertex accumulates Σ weight · value of the points around it.
5. **Blur**: along each of the d+1 lattice directions, new = old + ½ (left + right) — the
   1-2-1 kernel, halved — with missing neighbours counting as 0.
6. **Slice**: every point reads back Σ weight · vertex value, times α = 1 / (1 + 2^−d)
   (the normalisation of the sum of the blurred simplex weights).

Transposed filter ("reverse", used for gradients): splat and slice are each other's
transposes and each blur step is symmetric, so the transpose only reverses the order of the
blur directions.

Vertices are keyed by their first d coordinates (the last follows from the zero sum), packed
into 64-bit words (one for images: each coordinate's range, known from the features' ranges,
needs a dozen bits) and deduplicated with hash tables, one per block of corners, numbered in
order of first appearance (so that the pixels of one image row use nearby vertex rows).  Blur
neighbours come from sorting the packed keys and merging the sorted list with itself shifted by
one lattice step — sequential reads where one hash lookup per neighbour was a cache miss.
Coordinates take as many bits as their range needs (up to 31: features up to ~10^8 / d), so
they cannot overflow — pydensecrf uses 16-bit keys, which wrap for large images with small
spatial widths.
The arithmetic of steps 1-3 is float32 in the order of Krähenbühl's densecrf as pydensecrf
builds it on x86 (its SSE path: ties round to even), so that points land in the same simplices.
"""
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import parallel_njit
from ._simd import row_map, rows_of
from .softmax import BLOCK as SOFTMAX_BLOCK
from .softmax import softmax_block, softmax_rows

EMPTY = -1
# Indices in the hot loops are unsigned (np.uint64) where it pays: an index Numba cannot prove
# ≥ 0 — one read from an array, like a vertex row — is first tested for being negative and
# wrapped around (Python's a[-1]), a compare and an add per access; unsigned ones it uses as
# they are.  (Mixing uint64 and int64 in one expression gives float64 in Numba: every term
# of an index expression is converted.)
_u = np.uint64


def elevation_scale(d):
    """s_i of step 1, rounded as densecrf does (its constant √(2/3)·(d+1) is a float32)."""
    inv_std = np.float64(np.float32(np.sqrt(2.0 / 3.0) * (d + 1)))
    return np.array([1.0 / np.sqrt((i + 1) * (i + 2)) * inv_std for i in range(d)],
                    dtype=np.float32)


def canonical_simplex(d):
    """canonical[k, j]: offset of vertex k of the canonical simplex for rank j."""
    c = np.empty((d + 1, d + 1), dtype=np.int32)
    for k in range(d + 1):
        c[k, : d + 1 - k] = k
        c[k, d + 1 - k:] = k - (d + 1)
    return c


# ---- CPU: steps 1-3, a block of points at a time ---------------------------------------------
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


# ---- CPU: distinct vertices by hash tables, one per block of corners -----------------------------
# The N·(d+1) simplex corners name far fewer distinct vertices.  Each thread numbers the distinct
# keys of its own contiguous block of corners in a table of its own, in order of first
# appearance; then the blocks are merged in order: a vertex an earlier block has seen keeps that
# block's number, the others get the next free ones.  So the vertices are numbered in order of
# first appearance over all corners, whatever the number of threads (neighbouring pixels get
# neighbouring rows, which splat and slice want).  Tables start small and double whenever they
# are half full: one sized for the worst case (every point its own d+1 vertices) would be 10-20×
# too large and every probe a cache miss.  Even so a table of 10^5 vertices is larger than the
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


# ---- CPU: the vertices in sorted order (for the blur neighbours) --------------------------------
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
    # per column (NumPy's min(axis=0) on a tall, narrow array is ten times slower)
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


# ---- CPU: blur neighbours by merging sorted keys -------------------------------------------------
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


# ---- CPU: splat, blur, slice ---------------------------------------------------------------------

@intrinsic
def _prefetch_row_llvm(typingctx, array, row):
    """Ask the CPU to start loading row ``row`` of a C-contiguous 2-D array into its caches
    (LLVM's prefetch: read, keep in all levels), without waiting for it.  Slice and the blur's
    gathering pass read rows in an order the hardware cannot guess, but we know it a few
    points ahead: asking early hides part of the wait for the memory (alone, the slice ran
    15-25 % faster and the gathering pass ~45 %; the whole bilateral filter ~5 %)."""
    def codegen(context, builder, signature, args):
        view = context.make_array(signature.args[0])(context, builder, args[0])
        columns = builder.extract_value(view.shape, 1)
        index = args[1] if args[1].type == columns.type else builder.sext(args[1], columns.type)
        address = builder.bitcast(builder.gep(view.data, [builder.mul(index, columns)]),
                                  ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]),
            "llvm.prefetch.p0")
        builder.call(prefetch, [address, i32(0), i32(3), i32(1)])  # read, all caches, data
        return context.get_dummy_value()

    return types.none(array, row), codegen


AHEAD = 4  # points (splat, slice) between a prefetch and its use
# places between a prefetch and its use in the blur passes that read or write the buffer in
# an order of its own (the bilateral kernel's first and last): each place one row, where a
# point is d+1 of them (DeepLab's bilateral blur: 8 1.10× faster than 4 with the last
# pass's rows prefetched too, 16 no faster)
BLUR_AHEAD = 8
# splat and slice prefetch only from vertex buffers above this size: smaller ones stay in the
# caches, where the prefetches cost more than they hide (DeepLab's buffers, 10-18 MB: the
# CRF 4 % faster with them; the kernel normalisation's, < 1 MB: slices 20 % faster without)
PREFETCH_BYTES = 1 << 20


# ---- CPU: row operations in 8-wide SIMD (kernels/_simd.py) --------------------------------------
@intrinsic
def _row_add_scaled_simd(typingctx, dst, row, w, src, src_row):
    """dst[row] += w · src[src_row] (as the splat's loop)."""
    if not rows_of(dst, src):
        return None

    def codegen(context, builder, signature, args):
        def formula(rows, w, x):
            return builder.fadd(x[0], builder.fmul(w[0], x[1]))
        return row_map(context, builder, signature, args, (0, 1), [(0, 1), (3, 4)], [2], formula)

    return types.none(dst, row, w, src, src_row), codegen


@intrinsic
def _row_add_three_simd(typingctx, dst, row, base, w0, w1, w2, src, a, b, g):
    """dst[row] = base[row] + w0 · src[a] + w1 · src[b] + w2 · src[g] (as the slice's loop;
    base dst: add to it)."""
    if not rows_of(dst, base, src):
        return None

    def codegen(context, builder, signature, args):
        def formula(rows, w, x):
            terms = [builder.fmul(wi, xi) for wi, xi in zip(w, x[1:])]
            return builder.fadd(x[0], builder.fadd(builder.fadd(terms[0], terms[1]), terms[2]))
        return row_map(context, builder, signature, args, (0, 1),
                       [(2, 1), (6, 7), (6, 8), (6, 9)], [3, 4, 5], formula)

    return types.none(dst, row, base, w0, w1, w2, src, a, b, g), codegen


@intrinsic
def _row_blur_simd(typingctx, dst, row, src, s, a, b):
    """dst[row] = src[s] + ½ (src[a] + src[b]) (one blur step; dst is not src)."""
    if not rows_of(dst, src):
        return None

    def codegen(context, builder, signature, args):
        def formula(rows, _, x):
            half = rows.constant(ir.Constant(ir.FloatType(), 0.5), types.float32)
            return builder.fadd(x[0], builder.fmul(half, builder.fadd(x[1], x[2])))
        return row_map(context, builder, signature, args, (0, 1), [(2, 3), (2, 4), (2, 5)], [],
                       formula)

    return types.none(dst, row, src, s, a, b), codegen


def _prefetch_row_python(array, row):
    pass


def _row_add_scaled_python(dst, row, w, src, src_row):
    dst[row] += w * src[src_row]


def _row_add_three_python(dst, row, base, w0, w1, w2, src, a, b, g):
    dst[row] = base[row] + (w0 * src[a] + w1 * src[b] + w2 * src[g])


def _row_blur_python(dst, row, src, s, a, b):
    dst[row] = src[s] + np.float32(0.5) * (src[a] + src[b])


# plain Python (NUMBA_DISABLE_JIT=1, for debugging) cannot call intrinsics: the same
# operations, NumPy's way
_python = numba.config.DISABLE_JIT
_prefetch_row = _prefetch_row_python if _python else _prefetch_row_llvm
_row_add_scaled = _row_add_scaled_python if _python else _row_add_scaled_simd
_row_add_three = _row_add_three_python if _python else _row_add_three_simd
_row_blur = _row_blur_python if _python else _row_blur_simd


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
    # branch went either way at random, and its mispredictions cost 10-20 % of the splat.
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
    # in both, where two splats read the (N, c) values twice — with the README's parameters
    # the splats 1.2× faster.  The same sums in the same order: the same bits.  Both plans
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


# Two lattices splat in one pass only while their vertex buffers together fit in a cache of
# this size: beyond it the two streams of writes evict each other's rows (DeepLab's lattices,
# 18 + 10 MB: whole CRF runs 0.96-0.99× as fast together; the README's, 2 + 1 MB: 1.08-1.11×)
SPLAT_TOGETHER_BYTES = 8 << 20


def splat_together(lattices, values, pres):
    """``lattice.splat(values, pre)`` for each lattice (all over the same points): for two
    that both splat by scatter and whose buffers are small enough together
    (SPLAT_TOGETHER_BYTES), in one pass over the values (``_splat_scatter_two``), else one
    after the other.  Each lattice's ``lock`` must be held, as for ``splat``."""
    if len(lattices) == 2 and values.dtype == np.float32 and values.shape[1] > 1:
        first, second = lattices
        work = [lat._work_buffers(values.shape[1], np.float32) for lat in lattices]
        if all(rows is not None for _, _, rows in work) and \
                work[0][0].nbytes + work[1][0].nbytes <= SPLAT_TOGETHER_BYTES:
            values = np.ascontiguousarray(values)
            pres = [_per_point(pre, lat.N, np.float32) for lat, pre in zip(lattices, pres)]
            _splat_scatter_two_cpu(values, pres[0], first.bary, first.offsets, *first._bands(),
                                   work[0][2], pres[1], second.bary, second.offsets,
                                   *second._bands(), work[1][2],
                                   second.sorted and work[1][0].nbytes > PREFETCH_BYTES)
            for lat, (buf, scratch, _) in zip(lattices, work):
                lat._splatted = buf, scratch
            return
    for lat, pre in zip(lattices, pres):
        lat.splat(values, pre)


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


def _per_point(factor, N, dt):
    """A per-point factor (pre, post) as a contiguous (N,) array of dtype dt; None: ones."""
    return np.ones(N, dt) if factor is None else np.ascontiguousarray(factor, dtype=dt)


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


# ---- CPU: the whole blur in one sweep ------------------------------------------------------------
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
FUSED_BLUR = True  # False: always pass by pass; "always": one sweep for any lattice and c (tests)


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


# ---- CPU: splat, blur and slice in one sweep (a grid's lattice) -------------------------------
# For a pixel grid (the CRF's spatial kernel) the vertices are numbered in the order the pixels
# first touch them, so everything the filter does moves down the image together: the points
# of an image row splat into vertices of about one row of vertices, a blur neighbour is at most
# a row or two of vertices away, and a point slices from the vertices it splatted into.  The
# one-sweep blur above already keeps its passes in small rings; here the splat feeds the first
# pass through a ring too, and the slice reads the last pass's ring: the vertex buffer (18 MB
# with DeepLab's spatial kernel on a 500×375 image: written by the splat, read by the blur,
# written again and read by the slice, every iteration) is never made.  Each thread slices its
# share of the points; everything its share needs — the places of each pass and the points
# to splat — it recomputes in its own rings, a few image rows more than its share.
#
# The schedule goes in rounds.  In each, every stage — splat, the passes, the slice — moves on
# as far as the stage before it allows (a pass stays its reach behind the pass before; the
# first pass reads only vertices all of whose points are splatted; the slice takes the points
# whose vertices the last pass has made), but at most STREAM_TILE beyond what the stage after
# it reads next, so that no ring fills with rows that wait.  Bookkeeping per lattice
# (_stream_tables): top[n], the highest vertex of points 0..n; bottom[n], the lowest of points
# n..N−1; first[v], the first point of vertex v (which grows with v: vertices are numbered in
# order of first appearance); complete[v], how many points (from the first) cover every point
# of vertices 0..v.
STREAM_TILE = 256  # points or places a stage moves ahead per round, at most (64-1024: 256 best)
STREAM = True  # False: never streamed; "always": any grid-like lattice, however small (tests)
STREAM_BYTES = 4 << 20  # stream where the vertex buffer would be larger than this


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
_compare_step = njit(inline="always", cache=True)(_compare_step)
_merge_neighbours_cpu = parallel_njit(_merge_neighbours)
_mean_step = njit(cache=True)(_mean_step)
_to_buffer_order_cpu = parallel_njit(_to_buffer_order)
_reach_cpu = parallel_njit(_reach)
_group_by_vertex_cpu = njit(cache=True)(_group_by_vertex)
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
_stream_tables_cpu = njit(cache=True)(_stream_tables)
_splat_span = njit(inline="always", cache=True)(_splat_span)
_filter_streamed_cpu = parallel_njit(_filter_streamed)


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
        sorted order and its last pass scatters back (3× faster for 5-D).
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
        # (np.take: 3× faster than buffer_rows[...] here)
        self.buffer_neighbours = {j: np.take(buffer_rows, self.neighbours[j]) if self.sorted
                                  else self.neighbours[j] for j in (0, d)}

    def filter(self, values, reverse=False, pre=None, post=None, out=None, base=None):
        """values (N, c) float32 -> (N, c) float32: splat, blur along d+1 directions, slice.

        Optional per-point factors: ``pre`` (N,) scales the values before splatting, ``post``
        (N,) the result; with ``out`` given the result is *added* to it, or to ``base``
        (N, c) if that is given too, and written to ``out`` (the CRF's fused message passing:
        one pass over the pixels instead of four).  float64 values are filtered in float64
        (the same linear operator, for gradient checks).  A large grid-like lattice filters
        float32 values in one sweep (``stream``) where ``out`` is not the values' own array.
        """
        with self.lock:
            if values.dtype == np.float32 and values.ndim == 2 and \
                    self.streams(values.shape[1], reverse) and \
                    (out is None or not np.shares_memory(out, values)):
                return self.stream(values, pre, post, out, base, reverse=reverse)
            self.splat(values, pre)
            return self.slice(self.blur(reverse), post, out, base)

    def streams(self, c, reverse=False):
        """Whether ``stream`` can filter c float32 channels: a grid-like lattice (vertices
        visited in buffer order) whose buffer would be larger than STREAM_BYTES."""
        return self._stream_plan(c, reverse) is not None

    def stream(self, values, pre=None, post=None, out=None, base=None, softmax=False,
               reverse=False):
        """The filter of values (N, c) float32 (the transposed one with ``reverse``) as
        ``filter`` with ``slice``'s arguments, in one sweep through small rings
        (_filter_streamed) instead of through the vertex buffer.  ``out`` must not share
        memory with ``values`` (a thread's sweep reads the values of points beyond its share,
        which another thread may have written already).  Hold ``lock``."""
        c = values.shape[1]
        plan = self._stream_plan(c, reverse)
        if plan is None:
            raise ValueError(f"stream: this lattice does not stream {c} channels (streams)")
        if out is not None and np.shares_memory(out, values):
            raise ValueError("stream: out must not share memory with values")
        tables, reach, directions, masks, bases, rings = plan
        values = np.ascontiguousarray(values, dtype=np.float32)
        pre, post = _per_point(pre, self.N, np.float32), _per_point(post, self.N, np.float32)
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
        pre = _per_point(pre, self.N, dt)
        buf, scratch, rows = self._work_buffers(values.shape[1], dt)
        if rows is not None:
            # prefetching the rows of the points ahead pays where they are scattered over a
            # large buffer (the bilateral kernel: splat 20 % faster); a grid's are near
            _splat_scatter_cpu(values, pre, self.bary, self.offsets, *self._bands(), rows,
                               self.sorted and buf.nbytes > PREFETCH_BYTES)
        else:
            starts, members = self.members_by_vertex()
            _splat_gather_cpu(values, pre, self.bary, starts, members, buf)
        self._splatted = buf, scratch

    def blur(self, reverse=False):
        """Step 5 on the buffer of the last splat; returns the blurred vertex buffer."""
        if self._splatted is None:
            raise RuntimeError("blur needs a splat first (LatticeCPU.splat)")
        buf, scratch = self._splatted
        return self._blur(buf, scratch, reverse)

    def slice(self, blurred, post=None, out=None, base=None, softmax=False):
        """Step 6: (N, c) values read back from the vertex buffer ``blurred`` (from ``blur``),
        with ``post``, ``out`` and ``base`` as in ``filter``; ``softmax``: then each row of
        the result replaced by its softmax (the CRF's normalisation, fused)."""
        dt = blurred.dtype.type
        post = _per_point(post, self.N, dt)
        out, base, start = _slice_start(out, base, self.N, blurred.shape[1], dt)
        fused = softmax and dt == np.float32  # the fused softmax is float32's
        _slice_cpu(blurred, self.bary, self.offsets, post, dt(self.alpha), base, out, start,
                   fused, blurred.nbytes > PREFETCH_BYTES)
        if softmax and not fused:
            softmax_rows(out, out)
        return out

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

    def _blur(self, buf, scratch, reverse):
        """Blur along the d+1 directions (in reverse order for the transposed filter); returns
        the array holding the result, rows in buffer order like ``buf``: in one sweep where
        the rings it needs are small (_blur_fused), else pass by pass.

        Pass by pass, the passes alternate ``buf`` and ``scratch``.  Visiting in sorted order,
        the first pass gathers ``buf`` into sorted order, the passes in between keep that order
        and the last one scatters back into buffer order."""
        directions = list(range(self.d, -1, -1) if reverse else range(self.d + 1))
        # one channel (the kernel normalisation, once per lattice): the sweep's bookkeeping
        # costs more than it saves (DeepLab's lattices: 1.03× faster builds pass by pass)
        sweep = FUSED_BLUR == "always" or (FUSED_BLUR and buf.shape[1] > 1)
        rings = self._rings(directions, buf.shape[1], buf.dtype) if sweep else None
        if rings is not None:
            reach, masks, bases, ring_rows = rings
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

    def _rings(self, directions, c, dt):
        """(reach, masks, bases, rows) for _blur_fused in this order of directions, c channels
        of dtype dt and the current number of threads, made on first use and kept; None where
        the threads' rings together would hold more rows than the buffer (small lattices:
        their passes stay in the caches anyway)."""
        T = max(1, min(numba.get_num_threads(), self.M))
        key = (tuple(directions), c, np.dtype(dt).str, T)
        if key not in self._ring_plans:
            reach = self._reach()[directions]
            # pass i's ring is read by pass i+1, which runs reach[i+1] places behind it and
            # reads up to reach[i+1] places on either side, while pass i moves a tile ahead
            sizes = [1 << int(2 * reach[i + 1] + FUSED_TILE + 1).bit_length()
                     for i in range(len(directions) - 1)]
            bases = np.cumsum([1] + sizes[:-1]).astype(np.int64)  # row 0: the zero row
            total = 1 + sum(sizes)
            plan = None
            if T * total <= self.M or FUSED_BLUR == "always":
                rows = np.empty((T, total, c), dt)
                rows[:, 0] = 0
                plan = (reach, np.array(sizes, np.int64) - 1, bases, rows)
            self._ring_plans[key] = plan
        return self._ring_plans[key]

    def _stream_plan(self, c, reverse=False):
        """(tables, reach, directions, masks, bases, rings) for _filter_streamed with c
        float32 channels, the blur's directions in order (reversed: the transposed filter)
        and the current number of threads, made on first use and kept; None where the
        lattice does not stream (see ``streams``).  The rings' sizes come from a run of the
        schedule alone: the most rows each ring held, rounded up to a power of two (so that
        a slot is an AND)."""
        if not STREAM or (STREAM != "always" and self.M * c * 4 <= STREAM_BYTES):
            return None
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
                total = 1 + sum(sizes)
                if T * total <= self.M or STREAM == "always":
                    rings = np.empty((T, total, c), np.float32)
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
            # splat by scatter, unless its private rows would need more than one copy of the
            # buffer (or 256 MB): then by gather.  The scatter's private rows follow the
            # buffer's in one array (``rows``; ``buf`` is its first M + 1 rows).
            extra = self._bands()[2][-1]
            scatter = extra <= self.M and extra * c * np.dtype(dt).itemsize <= 256 << 20
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
