"""Softmax over the last axis of a 2-D array, in one fused pass.

    out[n, k] = exp(a[n, k] − max_k a[n, :]) / Σ_k exp(a[n, k] − max_k a[n, :])

Subtracting the row maximum keeps exp from overflowing and does not change the result.  The
CRF's mean-field loop normalises (N, C) log-potentials every iteration; one pass over the rows
(CPU: a Numba loop per row; CUDA, in softmax_cuda.py: one thread per row) replaces five array
operations and their temporaries.

Speed on the CPU (float32): Numba calls the C library's scalar ``expf`` for ``math.exp``, one
value at a time, and that call was most of the CRF's softmax time.  ``exp_f32`` below is exp
written with arithmetic only, so the compiler turns the loop into SIMD instructions (8 floats at
a time with AVX2).  float64 arrays (gradient checks) keep ``math.exp``.
"""
import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from tinydeeplab.backend import on_gpu

from . import parallel_njit
from ._simd import (LANES, SHORT_STEPS, Rows, combine_lanes, row_map, row_operation,
                    row_reduction, row_start, rows_of)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret the 32 bits of an int32 as a float32 (an LLVM bitcast: no instruction)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


if numba.config.DISABLE_JIT:  # plain Python (debugging) cannot call intrinsics
    def _float32_from_bits(bits):
        return np.array(bits, np.int32).view(np.float32)[()]


def _exp_f32(x):
    """exp(x) for float32 x ≤ 0, relative error ≤ 3e-7 (2-3 float32 ulps); below −87.3 it
    returns exp(−87.3) ≈ 1.2e-38 instead of a denormal or 0.

    Range reduction (Cody & Waite): x = n·ln 2 + r with n = round(x / ln 2), |r| ≤ ln2 / 2;
    ln 2 is split in a part with few significant bits (so n·ln2_hi is exact) and the rest.
    Then exp(x) = 2^n · exp(r): exp(r) by its Taylor polynomial to r^6 (Horner), 2^n by
    writing n + 127 into the exponent field of a float32 (bits 23-30).
    """
    f = np.float32
    x = max(x, f(-87.3))
    # np.floor keeps float32 (math.floor would return an integer, and integer × float32 is
    # float64 in Numba: the whole polynomial would run in double precision, 4 lanes not 8)
    n = np.floor(x * f(1.4426950408889634) + f(0.5))  # round(x / ln 2)
    r = x - n * f(0.693145751953125) - n * f(1.428606765330187e-06)
    p = f(1.0 / 720.0)
    p = p * r + f(1.0 / 120.0)
    p = p * r + f(1.0 / 24.0)
    p = p * r + f(1.0 / 6.0)
    p = p * r + f(0.5)
    p = p * r + f(1.0)
    p = p * r + f(1.0)
    return p * _float32_from_bits(np.int32(n + f(127.0)) << 23)


_exp_f32 = njit(inline="always", fastmath=True, cache=True)(_exp_f32)


# Rows of at least LANES labels go in 8-wide steps (kernels/_simd.py; the 21-long loops cost more
# in loop control and leftovers than in arithmetic): up to 32 labels the whole row in registers
# (_row_softmax_simd); longer ones the row maximum, then exp and sum in one pass, then the
# scaling.  The sum's order differs from a loop's: last-bit differences.
@intrinsic
def _row_max_simd(typingctx, a, n):
    """max of row n of a (≥ 8 columns)."""
    if not rows_of(a):
        return None

    def codegen(context, builder, signature, args):
        def larger(x, y):
            return builder.select(builder.fcmp_ordered(">", x, y), x, y)
        return row_reduction(context, builder, signature.args[0], args[0], args[1], larger,
                             float("-inf"))

    return a.dtype(a, n), codegen


def _vector_exp(builder, x):
    """_exp_f32 on a float32 vector (or scalar), in LLVM's instructions (the same steps)."""
    if not isinstance(x.type, ir.VectorType):  # a scalar: as a vector of one
        one = ir.VectorType(x.type, 1)
        zero = ir.Constant(ir.IntType(32), 0)
        x = builder.insert_element(ir.Constant(one, ir.Undefined), x, zero)
        return builder.extract_element(_vector_exp(builder, x), zero)
    vector = x.type
    lanes = vector.count

    def const(value):
        return ir.Constant(vector, [float(np.float32(value))] * lanes)

    floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector]),
                                           f"llvm.floor.v{lanes}f32")
    low = const(-87.3)
    x = builder.select(builder.fcmp_ordered("<", x, low), low, x)  # max(x, −87.3)
    n = builder.call(floor, [builder.fadd(builder.fmul(x, const(1.4426950408889634)),
                                          const(0.5))])
    r = builder.fsub(builder.fsub(x, builder.fmul(n, const(0.693145751953125))),
                     builder.fmul(n, const(1.428606765330187e-06)))
    p = const(1.0 / 720.0)
    for coefficient in (1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = builder.fadd(builder.fmul(p, r), const(coefficient))
    integers = ir.VectorType(ir.IntType(32), lanes)
    exponent = builder.shl(builder.fptosi(builder.fadd(n, const(127.0)), integers),
                           ir.Constant(integers, [23] * lanes))
    return builder.fmul(p, builder.bitcast(exponent, vector))


def _exp_any(builder, x):
    """_vector_exp for float32 values; float64 ones through float32 and back."""
    single = ir.FloatType()
    if isinstance(x.type, ir.VectorType):
        single = ir.VectorType(single, x.type.count)
    if x.type == single:
        return _vector_exp(builder, x)
    return builder.fpext(_vector_exp(builder, builder.fptrunc(x, single)), x.type)


def _out_and_source(context, builder, signature, args):
    """For an intrinsic (out, n, a, ...): pointers to row n of out and of a, the number of
    columns, the element type."""
    dst, columns = row_start(context, builder, signature.args[0], args[0], args[1])
    src, _ = row_start(context, builder, signature.args[2], args[2], args[1])
    return dst, src, columns, signature.args[0].dtype


@intrinsic
def _row_exp_sum_simd(typingctx, out, n, a, m):
    """out[n] = exp(a[n] − m) (as _exp_f32; out may be a), returning Σ out[n] — one pass over
    the row where subtracting, exponentiating and summing took three.  Steps as
    ``row_operation``'s (no two stores overlap); the 8-wide steps' values summed lane by lane,
    the lanes combined at the end, the tail's added on the way.  float64 rows are
    exponentiated in float32 too (only so that kernels which call the softmax for either
    dtype compile: float64 softmaxes take libm's exp, in _softmax_rows)."""
    if not rows_of(out, a):
        return None

    def codegen(context, builder, signature, args):
        dst, src, columns, dtype = _out_and_source(context, builder, signature, args)
        wide = Rows(context, builder, dtype, LANES)
        partial = cgutils.alloca_once_value(builder, ir.Constant(wide.type, [0.0] * LANES))
        tail = cgutils.alloca_once_value(builder, ir.Constant(wide.type.element, 0.0))

        def make_step(rows):
            m = rows.constant(args[3], signature.args[3])

            def step(column):
                e = _exp_any(builder, builder.fsub(rows.load(src, column), m))

                def write():
                    rows.store(dst, column, e)
                    if rows.lanes == LANES:
                        builder.store(builder.fadd(builder.load(partial), e), partial)
                    else:
                        builder.store(builder.fadd(builder.load(tail), combine_lanes(
                            builder, e, builder.fadd)), tail)
                return write
            return step

        row_operation(context, builder, dtype, columns, make_step)
        return builder.fadd(combine_lanes(builder, builder.load(partial), builder.fadd),
                            builder.load(tail))

    return out.dtype(out, n, a, m), codegen


@intrinsic
def _row_softmax_simd(typingctx, out, n, a):
    """out[n] = softmax(a[n]) for a row of LANES to SHORT_STEPS·LANES columns (the CRF's 21)
    held in registers: its ⌈C/8⌉ 8-wide steps loaded once — the last one ending at the last
    column, overlapping the one before unless 8 divides C —, their maximum, exp, the sum (the
    overlapped lanes counted once), and one store per step.  The three passes below
    (maximum; exp and sum, storing; scaling) load and store the row twice and exponentiate
    its last C mod 8 columns in up to three narrower steps of their own: 21 labels took four
    exp sequences where three do.  The overlapping stores write the same values twice, and
    nothing reads the row right after (the store-forwarding trap of _simd.row_tail)."""
    if not rows_of(out, a):
        return None

    def codegen(context, builder, signature, args):
        dst, src, columns, dtype = _out_and_source(context, builder, signature, args)
        rows = Rows(context, builder, dtype, LANES)
        i64 = columns.type
        steps = builder.lshr(builder.add(columns, ir.Constant(i64, LANES - 1)),
                             ir.Constant(i64, 3))
        done = builder.append_basic_block("softmax.done")
        switch = builder.switch(steps, done)  # (the caller sends only 1..SHORT_STEPS)
        lane = ir.Constant(ir.VectorType(i64, LANES), list(range(LANES)))
        for count in range(1, SHORT_STEPS + 1):
            block = builder.append_basic_block(f"softmax.{count}")
            switch.add_case(ir.Constant(i64, count), block)
            builder.position_at_end(block)
            starts = [ir.Constant(i64, LANES * k) for k in range(count - 1)]
            starts.append(builder.sub(columns, ir.Constant(i64, LANES)))
            # lane j of the last step is column C − 8 + j: not yet counted if j ≥ 8·count − C
            fresh = builder.icmp_signed(">=", lane, rows.broadcast(
                builder.sub(ir.Constant(i64, LANES * count), columns)))
            values = [rows.load(src, column) for column in starts]
            top = values[0]
            for v in values[1:]:
                top = builder.select(builder.fcmp_ordered(">", v, top), v, top)
            top = rows.broadcast(combine_lanes(builder, top, lambda x, y: builder.select(
                builder.fcmp_ordered(">", x, y), x, y)))
            e = [_exp_any(builder, builder.fsub(v, top)) for v in values]
            total = builder.select(fresh, e[-1], ir.Constant(rows.type, [0.0] * LANES))
            for x in e[:-1]:
                total = builder.fadd(x, total)
            inverse = rows.broadcast(builder.fdiv(
                context.get_constant(dtype, 1.0), combine_lanes(builder, total, builder.fadd)))
            for column, x in zip(starts, e):
                rows.store(dst, column, builder.fmul(x, inverse))
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return types.none(out, n, a), codegen


@intrinsic
def _row_times_simd(typingctx, out, n, x):
    """out[n] *= x."""
    if not rows_of(out):
        return None

    def codegen(context, builder, signature, args):
        return row_map(context, builder, signature, args, (0, 1), [(0, 1)], [2],
                       lambda rows, x, row: builder.fmul(row[0], x[0]))

    return types.none(out, n, x), codegen


def _row_max_python(a, n):
    return a[n].max()


def _row_times_python(out, n, x):
    out[n] *= x


def _row_exp_sum_python(out, n, a, m):
    for k in range(a.shape[1]):
        out[n, k] = _exp_f32(a[n, k] - m)
    return out[n].sum()


def _row_softmax_python(out, n, a):
    m = a[n].max()
    for k in range(a.shape[1]):
        out[n, k] = _exp_f32(a[n, k] - m)
    out[n] *= np.float32(1.0) / out[n].sum()


_python = numba.config.DISABLE_JIT  # plain Python (debugging) cannot call intrinsics
_row_softmax = _row_softmax_python if _python else _row_softmax_simd
_row_max = _row_max_python if _python else _row_max_simd
_row_times = _row_times_python if _python else _row_times_simd
_row_exp_sum = _row_exp_sum_python if _python else _row_exp_sum_simd
# the row operations by name, for code that composes them in a jitted loop of its own
# (benchmarks/crf_parts.py times the one-go softmax against max / exp-and-sum / times)
ROW_OPERATIONS = {"softmax": _row_softmax, "max": _row_max, "times": _row_times,
                  "exp_sum": _row_exp_sum}


def _softmax_rows(a, out):
    # any float dtype, libm's exp
    N, C = a.shape
    for n in prange(N):
        m = a[n, 0]
        for k in range(1, C):
            m = max(m, a[n, k])
        total = 0.0
        for k in range(C):
            e = math.exp(a[n, k] - m)
            out[n, k] = e
            total += e
        inv = 1.0 / total
        for k in range(C):
            out[n, k] *= inv


def _softmax_block(a, out, n0, n1):
    """Rows n0..n1−1 of the float32 array out set to the softmax of those of a (which may be
    out itself).

    Rows of 8 to 32 labels (the CRF's 21): each row in registers, in one go (_row_softmax:
    loaded once instead of once per pass).  Longer rows: per row its maximum, then
    exp and sum in one 8-wide pass (_row_exp_sum), then the scaling.  Shorter rows: the exp
    runs over the block's (n1−n0)·C contiguous values — one long loop the compiler vectorises,
    rather than C-long loops too short for SIMD."""
    C = a.shape[1]
    if LANES <= C <= SHORT_STEPS * LANES:
        for n in range(n0, n1):
            _row_softmax(out, n, a)
        return
    if C > SHORT_STEPS * LANES:
        for n in range(n0, n1):
            _row_times(out, n, np.float32(1.0) / _row_exp_sum(out, n, a, _row_max(a, n)))
        return
    for n in range(n0, n1):
        m = a[n, 0]
        for k in range(1, C):
            m = max(m, a[n, k])
        for k in range(C):
            out[n, k] = a[n, k] - m
    block = out[n0:n1].reshape(-1)
    for i in range(block.size):
        block[i] = _exp_f32(block[i])
    for n in range(n0, n1):
        total = np.float32(0.0)
        for k in range(C):
            total += out[n, k]
        inv = np.float32(1.0) / total
        for k in range(C):
            out[n, k] *= inv


_softmax_block = njit(inline="always", fastmath=True, cache=True)(_softmax_block)
# the same as a function of its own, for kernels compiled without fastmath (an inlined copy
# would take its caller's flags; called, it keeps its own): the CRF's slice
softmax_block = njit(fastmath=True, cache=True)(getattr(_softmax_block, "py_func", _softmax_block))
BLOCK = 32  # rows per block


def _softmax_rows_f32(a, out):
    # float32 with _exp_f32, in blocks of BLOCK rows
    N = a.shape[0]
    for b in prange((N + BLOCK - 1) // BLOCK):
        _softmax_block(a, out, b * BLOCK, min(N, (b + 1) * BLOCK))


_softmax_rows_cpu = parallel_njit(_softmax_rows)
# fastmath lets the compiler reorder the sums (for SIMD); the inputs are checked finite upstream
_softmax_rows_f32_cpu = parallel_njit(_softmax_rows_f32, fastmath=True)


def softmax_rows(a, out, cuda=None):
    """out = row-wise softmax of the 2-D float array a (NumPy → CPU, CuPy → CUDA;
    ``cuda=True`` runs the CUDA kernel on NumPy arrays under the simulator).  ``a`` and
    ``out`` are C-contiguous and of the same dtype; ``out`` may be ``a``."""
    if cuda or (cuda is None and on_gpu(a)):
        from . import softmax_cuda

        softmax_cuda.softmax_rows(a, out)
    elif a.dtype == np.float32 and out.dtype == np.float32:
        _softmax_rows_f32_cpu(a, out)
    else:
        _softmax_rows_cpu(a, out)
    return out
