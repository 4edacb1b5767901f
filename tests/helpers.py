"""Shared test oracles: the same inputs through tinydeeplab and PyTorch, forward and backward."""
import numpy as np
import pytest

from tinydeeplab import Tensor

torch = pytest.importorskip("torch", reason="torch (the [test] extra) is the reference for ops")


def compare_with_torch(ours, theirs, arrays, grad_mask=None, atol=1e-10, rtol=1e-7, seed=0):
    """Run ``ours`` on Tensors and ``theirs`` on torch tensors made from the same float64
    ``arrays``; assert equal outputs and equal gradients for a random output cotangent."""
    grad_mask = grad_mask or [True] * len(arrays)
    ts = [Tensor(a.copy(), requires_grad=g) for a, g in zip(arrays, grad_mask)]
    tt = [torch.tensor(a.copy(), requires_grad=g) for a, g in zip(arrays, grad_mask)]
    y, yt = ours(*ts), theirs(*tt)
    np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), atol=atol, rtol=rtol,
                               err_msg="forward differs from torch")
    v = np.random.default_rng(seed).standard_normal(y.shape)
    y.backward(v)
    yt.backward(torch.tensor(v))
    for i, (t, u) in enumerate(zip(ts, tt)):
        if not grad_mask[i]:
            continue
        g = np.zeros(t.shape) if t.grad is None else t.grad
        np.testing.assert_allclose(g, u.grad.numpy(), atol=atol, rtol=rtol,
                                   err_msg=f"gradient of input {i} differs from torch")
