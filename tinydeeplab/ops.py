"""Elementary differentiable operations: arithmetic with broadcasting, reductions, shapes, matmul.

Each operation is a ``Function`` whose ``backward`` is the chain rule for that one operation,
written next to its ``forward``.  Broadcasting (NumPy rules) is undone in the backward by
``unbroadcast``: an input that was stretched along an axis receives the *sum* of the gradient
over that axis, because each of its elements fed every position it was copied to.
"""
import numpy as np

from .autograd import Function, Tensor
from .backend import array_module, to_device


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape`` (the inverse of NumPy broadcasting for gradients)."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(extra))) if extra else grad
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=stretched, keepdims=True) if stretched else grad


def _as_tensor(value, like):
    """Constants (Python numbers, arrays) become tensors of the other operand's dtype/device."""
    if isinstance(value, Tensor):
        return value
    xp = array_module(like.data)
    if np.isscalar(value):
        return Tensor(xp.asarray(value, dtype=like.dtype))
    return Tensor(xp.asarray(value))


def _binary(fn, name, a, b):
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        raise TypeError(f"{name}: at least one operand must be a Tensor")
    a = _as_tensor(a, b if isinstance(b, Tensor) else a)
    b = _as_tensor(b, a)
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"{name}: shapes {a.shape} and {b.shape} cannot be broadcast together"
        ) from None
    return fn.apply(a, b)


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = a.shape, b.shape
        return a + b

    @staticmethod
    def backward(ctx, grad):
        sa, sb = ctx.shapes
        return unbroadcast(grad, sa), unbroadcast(grad, sb)


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = a.shape, b.shape
        return a - b

    @staticmethod
    def backward(ctx, grad):
        sa, sb = ctx.shapes
        return unbroadcast(grad, sa), unbroadcast(-grad, sb)


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        return unbroadcast(grad * b, a.shape), unbroadcast(grad * a, b.shape)


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        # d(a/b)/da = 1/b,  d(a/b)/db = -a/b²
        return unbroadcast(grad / b, a.shape), unbroadcast(-grad * a / (b * b), b.shape)


class Pow(Function):
    """a ** b for tensors a and b (b may be a broadcast scalar tensor)."""

    @staticmethod
    def forward(ctx, a, b):
        out = a**b
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, out = ctx.saved
        xp = array_module(a)
        da = grad * b * a ** (b - 1)
        # d(a^b)/db = a^b · ln a, defined for a > 0; 0 where a == 0 (the limit from above).
        with np.errstate(divide="ignore", invalid="ignore"):
            db = grad * out * xp.where(a > 0, xp.log(xp.where(a > 0, a, 1)), 0)
        return unbroadcast(da, a.shape), unbroadcast(db, b.shape)


class PowScalar(Function):
    """a ** p for a constant Python number p (the common case: squares, square roots)."""

    @staticmethod
    def forward(ctx, a, p):
        ctx.save_for_backward(a)
        ctx.p = p
        return a**p

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        return grad * ctx.p * a ** (ctx.p - 1), None


class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Exp(Function):
    @staticmethod
    def forward(ctx, a):
        out = array_module(a).exp(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return grad * out


class Log(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return array_module(a).log(a)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        return grad / a


class ReLU(Function):
    """max(x, 0).  Subgradient convention: d relu / dx = 0 at x == 0 (as PyTorch)."""

    @staticmethod
    def forward(ctx, a):
        mask = a > 0
        ctx.save_for_backward(mask)
        return a * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved
        return grad * mask


def _normalize_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for ax in axes:
        if not -ndim <= ax < max(ndim, 1):
            raise ValueError(f"axis {ax} is out of range for a tensor with {ndim} dimensions")
        out.append(ax % max(ndim, 1))
    return tuple(sorted(set(out)))


class Sum(Function):
    @staticmethod
    def forward(ctx, a, axis, keepdims):
        ctx.shape, ctx.axis = a.shape, axis
        return a.sum(axis=axis, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        # Every summed element contributed with weight 1: spread the gradient back.
        xp = array_module(grad)
        grad = xp.expand_dims(grad, ctx.axis) if grad.ndim != len(ctx.shape) else grad
        return xp.broadcast_to(grad, ctx.shape).copy(), None, None


class Reshape(Function):
    @staticmethod
    def forward(ctx, a, shape):
        ctx.shape = a.shape
        return a.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape), None


class Transpose(Function):
    @staticmethod
    def forward(ctx, a, axes):
        ctx.axes = axes
        return a.transpose(axes)

    @staticmethod
    def backward(ctx, grad):
        return grad.transpose(np.argsort(ctx.axes)), None


class MatMul(Function):
    """a @ b for tensors of ndim >= 2; leading (batch) dimensions broadcast."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return array_module(a).matmul(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        xp = array_module(a)
        da = xp.matmul(grad, xp.swapaxes(b, -1, -2))
        db = xp.matmul(xp.swapaxes(a, -1, -2), grad)
        return unbroadcast(da, a.shape), unbroadcast(db, b.shape)


class Maximum(Function):
    """Elementwise max(a, b); at ties each side gets half the gradient (as PyTorch)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return array_module(a).maximum(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        share = ((a > b) + 0.5 * (a == b)).astype(grad.dtype)  # a's share of the gradient
        return unbroadcast(grad * share, a.shape), unbroadcast(grad * (1 - share), b.shape)


class Concatenate(Function):
    @staticmethod
    def forward(ctx, axis, *arrays):
        ctx.axis = axis
        ctx.sizes = [a.shape[axis] for a in arrays]
        return array_module(arrays[0]).concatenate(arrays, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        xp = array_module(grad)
        cuts = np.cumsum(ctx.sizes)[:-1].tolist()
        return (None, *xp.split(grad, cuts, axis=ctx.axis))


class GetItem(Function):
    @staticmethod
    def forward(ctx, a, index):
        ctx.shape, ctx.dtype, ctx.index = a.shape, a.dtype, index
        return a[index]

    @staticmethod
    def backward(ctx, grad):
        xp = array_module(grad)
        out = xp.zeros(ctx.shape, dtype=grad.dtype)
        # add.at, not out[index] = grad: an index may name the same element twice.
        xp.add.at(out, ctx.index, grad)
        return out, None


class ToDevice(Function):
    @staticmethod
    def forward(ctx, a, device):
        ctx.source = "cuda" if array_module(a) is not np else "cpu"
        return to_device(a, device)

    @staticmethod
    def backward(ctx, grad):
        return to_device(grad, ctx.source), None


class AsType(Function):
    @staticmethod
    def forward(ctx, a, dtype):
        ctx.dtype = a.dtype
        return a.astype(dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.astype(ctx.dtype), None


# ---- the functional spelling -----------------------------------------------------------------
def add(a, b):
    return _binary(Add, "add", a, b)


def sub(a, b):
    return _binary(Sub, "sub", a, b)


def mul(a, b):
    return _binary(Mul, "mul", a, b)


def div(a, b):
    return _binary(Div, "div", a, b)


def pow(a, exponent):
    if isinstance(a, Tensor) and np.isscalar(exponent):
        return PowScalar.apply(a, exponent)
    return _binary(Pow, "pow", a, exponent)


def maximum(a, b):
    return _binary(Maximum, "maximum", a, b)


def neg(a):
    return Neg.apply(a)


def exp(a):
    return Exp.apply(a)


def log(a):
    return Log.apply(a)


def relu(a):
    return ReLU.apply(a)


def sum(a, axis=None, keepdims=False):
    axis = _normalize_axis(axis, a.ndim)
    return Sum.apply(a, axis, keepdims)


def mean(a, axis=None, keepdims=False):
    axis = _normalize_axis(axis, a.ndim)
    count = int(np.prod([a.shape[i] for i in axis])) if axis else 1
    if count == 0:
        raise ValueError(f"mean over axis {axis} of an empty tensor of shape {a.shape}")
    return sum(a, axis, keepdims) * (1.0 / count)


def reshape(a, shape):
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    known = int(np.prod([n for n in shape if n != -1]))
    if (-1 not in shape and known != a.size) or (-1 in shape and (known == 0 or a.size % known)):
        raise ValueError(f"reshape: cannot reshape a tensor of shape {a.shape} into {shape}")
    return Reshape.apply(a, shape)


def transpose(a, axes=None):
    axes = tuple(reversed(range(a.ndim))) if axes is None else tuple(ax % a.ndim for ax in axes)
    if sorted(axes) != list(range(a.ndim)):
        raise ValueError(f"transpose: axes {axes} are not a permutation of {a.ndim} dimensions")
    return Transpose.apply(a, axes)


def matmul(a, b):
    a = _as_tensor(a, b) if not isinstance(a, Tensor) else a
    b = _as_tensor(b, a)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(
            f"matmul needs tensors with at least 2 dimensions, got shapes {a.shape} and "
            f"{b.shape} (reshape vectors to (1, n) or (n, 1))"
        )
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"matmul: inner dimensions differ: {a.shape} @ {b.shape} "
            f"({a.shape[-1]} != {b.shape[-2]})"
        )
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(
            f"matmul: batch dimensions of {a.shape} and {b.shape} cannot be broadcast"
        ) from None
    return MatMul.apply(a, b)


def concatenate(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concatenate needs at least one tensor")
    first = tensors[0]
    axis = axis % first.ndim
    for i, t in enumerate(tensors):
        if t.ndim != first.ndim or any(
            t.shape[d] != first.shape[d] for d in range(first.ndim) if d != axis
        ):
            raise ValueError(
                f"concatenate along axis {axis}: tensor {i} has shape {t.shape}, "
                f"incompatible with tensor 0 of shape {first.shape}"
            )
    return Concatenate.apply(axis, *tensors)


def stack(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack needs at least one tensor")
    shapes = {t.shape for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"stack needs tensors of one shape, got {sorted(shapes)}")
    axis = axis % (tensors[0].ndim + 1)
    expanded = [reshape(t, t.shape[:axis] + (1,) + t.shape[axis:]) for t in tensors]
    return concatenate(expanded, axis=axis)


def getitem(a, index):
    if isinstance(index, Tensor):
        index = index.data
    return GetItem.apply(a, index)

