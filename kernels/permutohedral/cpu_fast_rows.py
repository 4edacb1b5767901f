"""Fast CPU lattice, part 2: row operations in 8-wide SIMD and prefetches (LLVM intrinsics).

A vertex row holds the c channels of one vertex (21 labels for VOC).  The splat, blur and slice
each combine a few rows per point or vertex; written as LLVM vector operations (``_simd``), each
row is loaded once and summed in registers.  Prefetches ask for rows whose index is known a few
points ahead but cannot be guessed by the hardware (scattered vertices).  Under
NUMBA_DISABLE_JIT the same operations run as NumPy expressions.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .._simd import row_map, rows_of


@intrinsic
def _prefetch_row_llvm(typingctx, array, row):
    """Ask the CPU to start loading row ``row`` of a C-contiguous 2-D array into its caches
    (LLVM's prefetch: read, keep in all levels), without waiting for it.  Slice and the blur's
    gathering pass read rows in an order the hardware cannot guess, but we know it a few
    points ahead: asking early hides part of the wait for the memory."""
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
# places between a prefetch and its use in the blur passes that read or write the buffer in an
# order of their own (the bilateral kernel's first and last): a place is one row, a point d+1
BLUR_AHEAD = 8


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
