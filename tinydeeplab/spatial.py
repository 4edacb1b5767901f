"""``F.max_pool2d``, ``F.interpolate`` and ``F.batch_norm``: the kernels as ``Function``s."""
from .autograd import Function, Tensor
from .backend import array_module
from .kernels import batch_norm as _bn
from .kernels import bilinear as _bilinear
from .kernels import max_pool as _pool


def _data(t, name):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    return t.data


class MaxPool2d(Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, ceil_mode):
        y, argmax = _pool.max_pool2d_forward(x, kernel_size, stride, padding, ceil_mode)
        ctx.save_for_backward(argmax)
        ctx.args = x.shape, kernel_size, stride, padding
        return y

    @staticmethod
    def backward(ctx, dy):
        (argmax,) = ctx.saved
        return _pool.max_pool2d_backward(dy, argmax, *ctx.args), None, None, None, None


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False):
    """Max pooling; the gradient goes to the first maximum of each window (as PyTorch)."""
    _pool.check_pool_args(_data(x, "x"), kernel_size, stride, padding, ceil_mode)
    return MaxPool2d.apply(x, kernel_size, stride, padding, ceil_mode)


class Bilinear(Function):
    @staticmethod
    def forward(ctx, x, size, align_corners):
        ctx.args = x.shape, align_corners
        return _bilinear.bilinear_forward(x, size, align_corners)

    @staticmethod
    def backward(ctx, dy):
        shape, align_corners = ctx.args
        return _bilinear.bilinear_backward(dy, shape, align_corners), None, None


def interpolate(x, size, mode="bilinear", align_corners=False):
    """Resize NCHW to ``size`` (H, W); only ``mode="bilinear"`` (what DeepLab uses)."""
    if mode != "bilinear":
        raise ValueError(f"interpolate: only mode='bilinear' is implemented, got {mode!r}")
    size = _bilinear.check_size(_data(x, "x"), size)
    return Bilinear.apply(x, size, align_corners)


class BatchNorm(Function):
    """bn(x), then ``+ residual`` if given (a ResNet block's end), then the ReLU if ``relu``,
    in one kernel pass each way."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, training, momentum,
                eps, relu):
        y, saved = _bn.batch_norm_forward(x, running_mean, running_var, weight, bias, training,
                                          momentum, eps, relu, residual=residual)
        ctx.save_for_backward(x, y if relu else None, weight)
        ctx.stats, ctx.training, ctx.relu = saved, training, relu
        ctx.residual = residual is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight = ctx.saved
        grads = _bn.batch_norm_backward(dy, x, y, ctx.stats, weight, ctx.training, ctx.relu,
                                        residual=ctx.residual)
        dx, dw, db, dres = grads if ctx.residual else (*grads, None)
        return dx, dw, db, dres, None, None, None, None, None, None


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, relu=False, residual=None):
    """Batch normalisation (PyTorch's argument order); ``relu=True`` fuses the ReLU after it.

    ``running_mean``/``running_var`` are arrays (or Tensors, whose data is used) updated in
    place in training; ``weight``/``bias`` are Tensors (learnable) or None.  ``residual``, a
    Tensor of x's shape (a ResNet block's shortcut), is added before the ReLU:
    ``relu(bn(x) + residual)``, the same bits as ``F.relu(F.batch_norm(x, ...) + residual)``.
    """
    data = _data(x, "x")
    rm = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    rv = running_var.data if isinstance(running_var, Tensor) else running_var
    w = None if weight is None else _data(weight, "weight")
    b = None if bias is None else _data(bias, "bias")
    _bn.check_bn_args(data, rm, rv, w, b)
    xp = array_module(data)
    weight = Tensor(xp.ones(data.shape[1], data.dtype)) if weight is None else weight
    bias = Tensor(xp.zeros(data.shape[1], data.dtype)) if bias is None else bias
    return BatchNorm.apply(x, weight, bias, residual, rm, rv, bool(training), momentum, eps,
                           bool(relu))
