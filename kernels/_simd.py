"""Row operations in 8-wide SIMD, written directly in LLVM's vector instructions (CPU).

The CRF's kernels spend their time in short row operations: a row is one lattice vertex's, or
one pixel's, c = 21 label channels.  The loop Numba's compiler makes of ``for k in range(c)``
(c known only at run time) first checks at run time that the rows do not overlap, then runs 16
channels as two 8-wide instructions, 4 more as a 4-wide one and the last alone, each part with
its own loop control — per row, far more instructions than arithmetic.  The helpers below let
a kernel module write an intrinsic that does the row operation in ⌊c/8⌋ 8-wide steps and the
c mod 8 columns left in at most one 4-wide, one 2-wide and one single step (21 = 8 + 8 + 4 +
1), switched once per row.  Elementwise, the intrinsics do the arithmetic of the loops they
replace in the same order: bit-identical results.  Reductions (a row's maximum or sum)
combine 8 lanes at a time and then the lanes by halves.  Rows of fewer than 8 columns go one
column at a time.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils

LANES = 8
_i64 = ir.IntType(64)


def rows_of(*arrays):
    """Whether an intrinsic can take these arrays: 2-D, C-contiguous, one float type (rows are
    read as runs of memory, and each array's column count from its own shape)."""
    return all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C"
               and a.dtype == arrays[0].dtype and isinstance(a.dtype, types.Float)
               for a in arrays)


def row_start(context, builder, arraytype, array, row):
    """Pointer to row ``row`` of a C-contiguous 2-D array, and its number of columns."""
    view = context.make_array(arraytype)(context, builder, array)
    columns = builder.extract_value(view.shape, 1)
    row = row if row.type == _i64 else builder.sext(row, _i64)
    return builder.gep(view.data, [builder.mul(row, columns)]), columns


class Rows:
    """Loads, stores and constants for rows of one element type, ``lanes`` elements at a time
    (8: one AVX2 register for float32, two for float64; 1: plain scalars)."""

    def __init__(self, context, builder, dtype, lanes):
        self.context, self.builder, self.dtype = context, builder, dtype
        element = context.get_data_type(dtype)
        self.lanes = lanes
        self.type = ir.VectorType(element, lanes) if lanes > 1 else element

    def _at(self, start, column):
        return self.builder.bitcast(self.builder.gep(start, [column]), self.type.as_pointer())

    def load(self, start, column):
        return self.builder.load(self._at(start, column), align=1)

    def store(self, start, column, value):
        self.builder.store(value, self._at(start, column), align=1)

    def constant(self, value, valuetype):
        """A scalar of Numba type valuetype, converted to the row type, in all lanes."""
        x = self.context.cast(self.builder, value, valuetype, self.dtype)
        if self.lanes == 1:
            return x
        return self.broadcast(x)

    def broadcast(self, x):
        vector = ir.VectorType(x.type, self.lanes)
        one = self.builder.insert_element(ir.Constant(vector, ir.Undefined), x,
                                          ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), self.lanes), [0] * self.lanes)
        return self.builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), zeros)


SHORT_STEPS = 4  # rows of up to 4 whole steps (32 float32 columns: the CRF's 21 labels) unrolled


def row_operation(context, builder, dtype, columns, make_step):
    """Emit a row operation over ``columns`` columns.  make_step(rows) returns step(column),
    which reads its inputs at column.. (rows.lanes of them) and returns a function that writes
    its result.  The whole 8-wide steps — for rows of up to SHORT_STEPS of them as
    straight-line code, one version per number of steps, chosen by one switch per row (a loop
    over two or three steps cost more in its control than the arithmetic) — then the
    remaining columns % 8 as at most one 4-wide, one 2-wide and one single step (``tail``).
    Fewer than LANES columns: one column at a time."""
    wide = builder.icmp_unsigned(">=", columns, ir.Constant(_i64, LANES))
    with builder.if_else(wide) as (vectors, scalars):
        with vectors:
            step = make_step(Rows(context, builder, dtype, LANES))
            whole = builder.lshr(columns, ir.Constant(_i64, 3))  # ⌊columns / 8⌋
            tail = builder.append_basic_block("row.tail")
            longer = builder.append_basic_block("row.long")
            switch = builder.switch(whole, longer)
            for n in range(1, SHORT_STEPS + 1):
                block = builder.append_basic_block(f"row.{n}")
                switch.add_case(ir.Constant(_i64, n), block)
                builder.position_at_end(block)
                for k in range(n):
                    step(ir.Constant(_i64, LANES * k))()
                builder.branch(tail)
            builder.position_at_end(longer)
            with cgutils.for_range(builder, whole) as loop:
                step(builder.shl(loop.index, ir.Constant(_i64, 3)))()
            builder.branch(tail)
            builder.position_at_end(tail)
            row_tail(context, builder, dtype, columns, make_step)
        with scalars:
            step = make_step(Rows(context, builder, dtype, 1))
            with cgutils.for_range(builder, columns) as loop:
                step(loop.index)()


def row_tail(context, builder, dtype, columns, make_step):
    """The last columns % 8 columns of a row (after its whole 8-wide steps) as a 4-wide, a
    2-wide and a single step, each where that bit of the remainder is set — not one more
    8-wide step ending at the last column and overlapping the step before it: a store that
    partly overlaps an earlier one defeats the CPU's store-to-load forwarding, so the next
    row operation on the same row (the splat adds to one vertex row point after point) would
    wait for both stores to reach the cache."""
    rest = builder.and_(columns, ir.Constant(_i64, LANES - 1))
    column = builder.sub(columns, rest)
    for lanes in (4, 2, 1):
        step = make_step(Rows(context, builder, dtype, lanes))
        bit = builder.and_(rest, ir.Constant(_i64, lanes))
        with builder.if_then(builder.icmp_unsigned("!=", bit, ir.Constant(_i64, 0))):
            step(column)()
        column = builder.add(column, bit)


def row_map(context, builder, signature, args, dst, sources, scalars, formula):
    """Emit dst row = formula(...) through row_operation: dst and each of sources is a pair
    (argument index of the array, argument index of the row); scalars are argument indices of
    numbers made row constants.  formula(rows, constants, values) gets the source rows' values
    at one step, in order.  Returns the intrinsic's (empty) result."""
    arraytype = signature.args[dst[0]]
    d, columns = row_start(context, builder, arraytype, args[dst[0]], args[dst[1]])
    starts = [row_start(context, builder, signature.args[a], args[a], args[r])[0]
              for a, r in sources]

    def make_step(rows):
        constants = [rows.constant(args[i], signature.args[i]) for i in scalars]

        def step(column):
            new = formula(rows, constants, [rows.load(s, column) for s in starts])
            return lambda: rows.store(d, column, new)
        return step

    row_operation(context, builder, arraytype.dtype, columns, make_step)
    return context.get_dummy_value()


def row_reduction(context, builder, arraytype, array, row, combine, neutral):
    """combine over row ``row`` of at least LANES columns (it only reads, so its last step may
    overlap): 8-wide partial results over the whole steps, then one more 8-wide load ending
    at the last column with the lanes already counted replaced by ``neutral``, then the 8
    lanes combined by halves."""
    start, columns = row_start(context, builder, arraytype, array, row)
    rows = Rows(context, builder, arraytype.dtype, LANES)
    partial = cgutils.alloca_once_value(builder, rows.load(start, ir.Constant(_i64, 0)))
    steps = builder.lshr(columns, ir.Constant(_i64, 3))
    with cgutils.for_range(builder, builder.sub(steps, ir.Constant(_i64, 1))) as loop:
        column = builder.shl(builder.add(loop.index, ir.Constant(_i64, 1)), ir.Constant(_i64, 3))
        builder.store(combine(builder.load(partial), rows.load(start, column)), partial)
    last = rows.load(start, builder.sub(columns, ir.Constant(_i64, LANES)))
    return reduce_lanes(builder, rows, columns, builder.load(partial), last, combine, neutral)


def reduce_lanes(builder, rows, columns, partial, last, combine, neutral):
    """The end of a reduction over a row of ``columns`` ≥ LANES columns: ``partial``, the
    8-wide result over the whole steps, combined with the lanes of the last (overlapping) step
    ``last`` that no whole step has counted (the others replaced by ``neutral``), then its 8
    lanes combined by halves."""
    # lane j of the last step is column columns − 8 + j: new if j ≥ 8·(whole steps + 1) − columns
    steps = builder.lshr(columns, ir.Constant(_i64, 3))
    first_new = builder.sub(builder.shl(builder.add(steps, ir.Constant(_i64, 1)),
                                        ir.Constant(_i64, 3)), columns)
    lanes = ir.Constant(ir.VectorType(_i64, LANES), list(range(LANES)))
    new = builder.icmp_signed(">=", lanes, rows.broadcast(first_new))
    last = builder.select(new, last, ir.Constant(rows.type, [neutral] * LANES))
    return combine_lanes(builder, combine(partial, last), combine)


def combine_lanes(builder, vector, combine):
    """combine over the lanes of a vector (a scalar passes through), by halves: lanes 0-3
    with 4-7, then 0-1 with 2-3, then 0 with 1 (three steps, not seven in a row)."""
    if not isinstance(vector.type, ir.VectorType):
        return vector
    width = vector.type.count
    while width > 1:
        width //= 2
        halves = [builder.shuffle_vector(vector, vector, ir.Constant(
            ir.VectorType(ir.IntType(32), width), list(range(first, first + width))))
            for first in (0, width)]
        vector = combine(*halves)
    return builder.extract_element(vector, ir.Constant(ir.IntType(32), 0))
