"""``F.conv2d``: the atrous convolution kernels wrapped as a differentiable ``Function``."""
from .autograd import Function, Tensor
from .kernels import atrous_conv


class Conv2d(Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation):
        ctx.save_for_backward(x, w)
        ctx.args = stride, padding, dilation
        ctx.has_bias = b is not None
        return atrous_conv.conv2d_forward(x, w, b, stride, padding, dilation)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved
        dx, dw, db = atrous_conv.conv2d_backward(x, w, dy, *ctx.args,
                                                 need_dx=ctx.needs_input_grad[0])
        return dx, dw, (db if ctx.has_bias else None), None, None, None


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1):
    """2-D convolution with holes on NCHW tensors; w is (K, C, kh, kw), b is (K,) or None.

    ``stride``, ``padding`` and ``dilation`` are ints or (h, w) pairs; see
    ``tinydeeplab.kernels.atrous_conv`` for the index math and output size.
    """
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, Tensor):
            raise TypeError(f"conv2d: {name} must be a Tensor, got {type(t).__name__}")
    if b is not None and not isinstance(b, Tensor):
        raise TypeError(f"conv2d: b must be a Tensor or None, got {type(b).__name__}")
    # Validate here too, so that errors name the Tensor arguments before any kernel runs; the
    # (h, w) pairs it returns are what the kernels check again fastest.
    stride, padding, dilation, _ = atrous_conv.check_conv_args(
        x.data, w.data, None if b is None else b.data, stride, padding, dilation)
    return Conv2d.apply(x, w, b, stride, padding, dilation)
