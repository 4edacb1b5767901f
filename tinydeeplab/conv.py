"""``F.conv2d``: the atrous convolution kernels wrapped as a differentiable ``Function``."""
from .autograd import Function, Tensor
from .kernels import aspp, atrous_conv


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


class ASPPConv(Function):
    @staticmethod
    def forward(ctx, x, *params, rates):
        B = len(rates)
        weights, biases = params[:B], params[B:]
        ctx.save_for_backward(x, *weights)
        ctx.rates, ctx.bias_given = rates, [b is not None for b in biases]
        return aspp.aspp_forward(x, weights, biases, rates)

    @staticmethod
    def backward(ctx, dy):
        x, *weights = ctx.saved
        dx, dws, dbs = aspp.aspp_backward(x, weights, dy, ctx.rates,
                                          need_dx=ctx.needs_input_grad[0])
        return (dx, *dws, *(db if given else None for db, given in zip(dbs, ctx.bias_given)))


def aspp_conv2d(x, weights, biases, rates):
    """Σ_b conv2d(x, weights[b], biases[b], padding=rate_b·(k − 1)/2, dilation=rate_b): the
    ASPP head's parallel branches, computed as one convolution on the CPU (see
    ``tinydeeplab.kernels.aspp``).  ``biases``: one Tensor or None per branch."""
    weights, biases = list(weights), list(biases)
    for name, t in [("x", x)] + [(f"weights[{i}]", w) for i, w in enumerate(weights)]:
        if not isinstance(t, Tensor):
            raise TypeError(f"aspp_conv2d: {name} must be a Tensor, got {type(t).__name__}")
    for i, b in enumerate(biases):
        if b is not None and not isinstance(b, Tensor):
            raise TypeError(f"aspp_conv2d: biases[{i}] must be a Tensor or None, got "
                            f"{type(b).__name__}")
    rates, _ = aspp.check_aspp_args(x.data, [w.data for w in weights],
                                    [None if b is None else b.data for b in biases], rates)
    return ASPPConv.apply(x, *weights, *biases, rates=tuple(rates))
