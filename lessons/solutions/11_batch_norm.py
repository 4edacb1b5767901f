"""Lesson 11: batch norm's backward in training mode."""
import numpy as np

CHECK = "check_batch_norm_backward"


def batch_norm_backward(x, gamma, g, eps):
    axes = (0, 2, 3)
    mu = x.mean(axes, keepdims=True)
    var = x.var(axes, keepdims=True)
    xhat = (x - mu) / np.sqrt(var + eps)
    dbeta = g.sum(axes)
    dgamma = (g * xhat).sum(axes)
    dx = gamma[None, :, None, None] / np.sqrt(var + eps) * (
        g - g.mean(axes, keepdims=True) - xhat * (g * xhat).mean(axes, keepdims=True))
    return dx, dgamma, dbeta


def as_if_frozen(x, gamma, g, eps):
    """The statistics treated as constants: right for frozen batch norm, wrong here."""
    axes = (0, 2, 3)
    var = x.var(axes, keepdims=True)
    xhat = (x - x.mean(axes, keepdims=True)) / np.sqrt(var + eps)
    return gamma[None, :, None, None] / np.sqrt(var + eps) * g, (g * xhat).sum(axes), g.sum(axes)


SOLUTION, MISTAKE = batch_norm_backward, as_if_frozen
