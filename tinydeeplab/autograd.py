"""Reverse-mode automatic differentiation in the style of micrograd, on NumPy or CuPy arrays.

A ``Tensor`` wraps one array.  Every differentiable operation is a ``Function`` with a
``forward`` (arrays in, array out) and a ``backward`` (the gradient of the output in, one
gradient per input out).  Calling ``Function.apply`` runs ``forward`` and, when any input needs a
gradient, records the function, its saved state (``ctx``) and its inputs on the output tensor.
Those records form a directed acyclic graph; ``Tensor.backward`` walks it once in reverse
topological order, so every node has received the gradients of *all* its consumers (summed:
a tensor used twice gets the sum of both contributions) before it passes its own on.
"""
import contextlib

import numpy as np

from .backend import array_module, device_of, to_device

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Inside this block operations are not recorded (inference, optimiser updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


class Context:
    """What a ``Function.forward`` leaves for its ``backward``.

    ``needs_input_grad[i]`` tells whether positional argument i is a tensor that wants a
    gradient, so a backward can skip work nobody asked for (the image's gradient, say).
    """

    def save_for_backward(self, *arrays):
        self.saved = arrays


class Function:
    """Base class of differentiable operations.

    Subclasses implement ``forward(ctx, *args, **kwargs) -> array`` on raw arrays and
    ``backward(ctx, grad) -> gradient or tuple of gradients``, one per positional argument of
    ``forward`` (``None`` for arguments that are not differentiable).
    """

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs):
        ctx = Context()
        ctx.needs_input_grad = tuple(isinstance(a, Tensor) and a.requires_grad for a in args)
        raw = [a.data if isinstance(a, Tensor) else a for a in args]
        out = Tensor(cls.forward(ctx, *raw, **kwargs))
        if _grad_enabled and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            out.requires_grad = True
            out._node = (cls, ctx, args)
        return out


class Tensor:
    """An array plus what is needed to differentiate through it.

    ``data`` is a ``numpy.ndarray`` (CPU) or ``cupy.ndarray`` (GPU); ``grad`` is filled by
    ``backward()`` for leaf tensors created with ``requires_grad=True``.
    """

    __array_priority__ = 1000  # so that ndarray + Tensor calls Tensor.__radd__

    def __init__(self, data, requires_grad=False):
        if isinstance(data, Tensor):
            data = data.data
        xp = array_module(data)
        data = xp.asarray(data)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(
                f"only floating-point tensors can require gradients, got dtype {data.dtype}"
            )
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None  # (Function subclass, ctx, inputs) for results of operations

    # ---- array facts -------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: device_of(self.data))

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{grad}, device='{self.device}')"

    # ---- conversions -------------------------------------------------------------------
    def numpy(self):
        """The data as a NumPy array (copied from the GPU when needed)."""
        return to_device(self.data, "cpu")

    def item(self):
        return self.numpy().item()

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def to(self, device):
        """This tensor on ``"cpu"`` or ``"cuda"``; differentiable (gradients go back)."""
        if device == self.device:
            return self
        return ops.ToDevice.apply(self, device=device)

    def astype(self, dtype):
        return ops.AsType.apply(self, dtype=np.dtype(dtype))

    # ---- backward ----------------------------------------------------------------------
    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad."""
        if not self.requires_grad:
            raise RuntimeError("backward() called on a tensor that does not require grad")
        xp = array_module(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient argument needs a scalar (one element), "
                    f"but this tensor has shape {self.shape}; pass grad= of that shape"
                )
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else grad
            grad = xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(
                    f"backward(grad): grad has shape {grad.shape}, expected {self.shape}"
                )

        grads = {id(self): grad}
        for node in reversed(self.topological_order()):
            g = grads.pop(id(node))
            if node._node is None:  # a leaf: keep the gradient
                node.grad = g if node.grad is None else node.grad + g
                continue
            fn, ctx, inputs = node._node
            input_grads = fn.backward(ctx, g)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for t, gt in zip(inputs, input_grads):
                if isinstance(t, Tensor) and t.requires_grad and gt is not None:
                    if gt.dtype != t.dtype:  # a gradient has its tensor's dtype, always
                        gt = gt.astype(t.dtype)
                    grads[id(t)] = gt if id(t) not in grads else grads[id(t)] + gt

    @property
    def creator(self):
        """The Function that computed this tensor, or None (a leaf: an input or a parameter,
        or a result computed without gradients)."""
        return None if self._node is None else self._node[0]

    @property
    def inputs(self):
        """The tensors this one was computed from that need gradients: the graph's edges."""
        if self._node is None:
            return []
        return [t for t in self._node[2] if isinstance(t, Tensor) and t.requires_grad]

    def topological_order(self):
        """Nodes reachable from self, each after all of its inputs (iterative DFS)."""
        order, visited, stack = [], set(), [(self, False)]
        while stack:
            node, inputs_done = stack.pop()
            if inputs_done:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            for t in node.inputs:
                if id(t) not in visited:
                    stack.append((t, False))
        return order

    # ---- operators: thin wrappers over the Functions in ops.py ----------------------------
    def __add__(self, other): return ops.add(self, other)
    def __radd__(self, other): return ops.add(other, self)
    def __sub__(self, other): return ops.sub(self, other)
    def __rsub__(self, other): return ops.sub(other, self)
    def __mul__(self, other): return ops.mul(self, other)
    def __rmul__(self, other): return ops.mul(other, self)
    def __truediv__(self, other): return ops.div(self, other)
    def __rtruediv__(self, other): return ops.div(other, self)
    def __neg__(self): return ops.neg(self)
    def __pow__(self, exponent): return ops.pow(self, exponent)
    def __rpow__(self, base): return ops.pow(base, self)
    def __matmul__(self, other): return ops.matmul(self, other)
    def __rmatmul__(self, other): return ops.matmul(other, self)
    def __getitem__(self, index): return ops.getitem(self, index)

    def sum(self, axis=None, keepdims=False): return ops.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return ops.mean(self, axis, keepdims)
    def exp(self): return ops.exp(self)
    def log(self): return ops.log(self)
    def relu(self): return ops.relu(self)

    def reshape(self, *shape):
        return ops.reshape(self, shape[0] if len(shape) == 1 else shape)

    def transpose(self, *axes):
        if len(axes) == 1 and (axes[0] is None or not np.isscalar(axes[0])):
            axes = axes[0]  # transpose((1, 0)) as well as transpose(1, 0)
        return ops.transpose(self, axes or None)

    @property
    def T(self):
        return self.transpose()


from . import ops  # noqa: E402  (ops needs Tensor and Function, defined above)
