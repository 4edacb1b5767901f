"""Differentiable operations for networks, in the spelling of ``torch.nn.functional``.

``import tinydeeplab.functional as F`` gives the elementary ops of ``ops.py`` (``F.add``,
``F.matmul``, ...) and the network ones defined here: activations, the softmax family, the
segmentation loss, convolution (``F.conv2d``, in ``conv.py``), and pooling, resizing and batch
normalisation (``spatial.py``).
"""
import numpy as np

from .autograd import Function, Tensor
from .backend import array_module, to_device
from .conv import aspp_conv2d, conv2d  # noqa: F401  (re-exported)
from .spatial import batch_norm, interpolate, max_pool2d  # noqa: F401  (re-exported)
from .ops import (  # noqa: F401  (re-exported)
    add,
    concatenate,
    div,
    exp,
    log,
    matmul,
    maximum,
    mean,
    mul,
    neg,
    pow,
    relu,
    reshape,
    stack,
    sub,
    sum,
    transpose,
)


def _check_axis(x, axis, name):
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for a tensor of shape {x.shape}")
    return axis % x.ndim


def _log_softmax(a, axis):
    # Subtract the maximum first: exp never overflows and the result is unchanged, because
    # log_softmax(a) = a - logsumexp(a) is invariant to adding a constant along the axis.
    shifted = a - a.max(axis=axis, keepdims=True)
    return shifted - array_module(a).log(array_module(a).exp(shifted).sum(axis=axis, keepdims=True))


class Softmax(Function):
    @staticmethod
    def forward(ctx, a, axis):
        out = array_module(a).exp(_log_softmax(a, axis))
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, grad):
        # Jacobian of softmax: diag(p) - p pᵀ, so  dx = p ⊙ (g - <g, p>).
        (p,) = ctx.saved
        return p * (grad - (grad * p).sum(axis=ctx.axis, keepdims=True)), None


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx, a, axis):
        out = _log_softmax(a, axis)
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, grad):
        # d log p_i / d a_j = δ_ij - p_j,  so  dx = g - p · Σ_i g_i.
        (logp,) = ctx.saved
        p = array_module(logp).exp(logp)
        return grad - p * grad.sum(axis=ctx.axis, keepdims=True), None


def softmax(x, axis=1):
    return Softmax.apply(x, _check_axis(x, axis, "softmax"))


def log_softmax(x, axis=1):
    return LogSoftmax.apply(x, _check_axis(x, axis, "log_softmax"))


class CrossEntropy(Function):
    """Mean of -log softmax(logits)[target] over pixels whose target is not ``ignore_index``.

    logits (N, C, *spatial), target (N, *spatial) integers.  The gradient w.r.t. the logits is
    (softmax - one_hot(target)) / count on counted pixels and 0 on ignored ones.  When every
    pixel is ignored the loss is defined as 0 with zero gradient (not 0/0 = NaN).
    """

    @staticmethod
    def forward(ctx, logits, target, ignore_index):
        xp = array_module(logits)
        valid = target != ignore_index  # (N, *spatial)
        safe_target = xp.where(valid, target, 0)
        logp = _log_softmax(logits, 1)
        picked = xp.take_along_axis(logp, safe_target[:, None].astype(xp.int64), axis=1)[:, 0]
        count = int(valid.sum())
        ctx.save_for_backward(logp, safe_target, valid)
        ctx.count = count
        if count == 0:
            return xp.zeros((), dtype=logits.dtype)
        return (-(picked * valid).sum() / count).astype(logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        logp, safe_target, valid = ctx.saved
        xp = array_module(logp)
        if ctx.count == 0:
            return xp.zeros_like(logp), None, None
        dlogits = xp.exp(logp)
        onehot_index = safe_target[:, None].astype(xp.int64)
        xp.put_along_axis(
            dlogits, onehot_index, xp.take_along_axis(dlogits, onehot_index, axis=1) - 1, axis=1
        )
        dlogits *= valid[:, None] * (grad / ctx.count)
        return dlogits.astype(logp.dtype), None, None


def cross_entropy(logits, target, ignore_index=255):
    """Pixel-wise cross-entropy, the DeepLab training loss (mean over non-ignored pixels)."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"cross_entropy: logits must be a Tensor, got {type(logits).__name__}")
    target = target.data if isinstance(target, Tensor) else target
    xp = array_module(logits.data)
    target = xp.asarray(target)
    if logits.ndim < 2:
        raise ValueError(
            f"cross_entropy: logits must be (N, C, ...), got shape {logits.shape}"
        )
    expected = (logits.shape[0],) + logits.shape[2:]
    if target.shape != expected:
        raise ValueError(
            f"cross_entropy: target has shape {target.shape}, expected {expected} for logits "
            f"of shape {logits.shape}"
        )
    if target.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must hold integers, got dtype {target.dtype}")
    C = logits.shape[1]
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    if bool(bad.any()):
        values = np.unique(to_device(target[bad], "cpu"))
        raise ValueError(
            f"cross_entropy: target holds {values[:10].tolist()}, outside 0..{C - 1} and "
            f"not ignore_index={ignore_index}"
        )
    return CrossEntropy.apply(logits, target, ignore_index)
