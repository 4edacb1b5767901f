"""Layers with parameters: ``Module`` and the few layers DeepLab needs.

A ``Module`` finds its parameters, buffers (running statistics) and sub-modules from its
attributes, in the order they were set, and names them by attribute path
(``layer1.0.conv1.weight``) — the same names torchvision uses, so its ResNet weights load by
name.  ``state_dict()`` / ``load_state_dict()`` move NumPy arrays in and out.
"""
import collections
import math

import numpy as np

from . import functional as F
from .autograd import Tensor
from .backend import array_module, to_device


# BatchNorm2d(relu=True) runs batch norm, the residual addition that ends a ResNet block and
# the ReLU after them in one kernel pass (saving full reads and writes of the activations each
# way); False runs them as separate operations, for comparison.  The results are the same.
FUSE_BN_RELU = True


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimiser updates (requires_grad by default)."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)


class Module:
    def __init__(self):
        object.__setattr__(self, "_parameters", collections.OrderedDict())
        object.__setattr__(self, "_buffers", collections.OrderedDict())
        object.__setattr__(self, "_modules", collections.OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                               "before setting attributes")
        for table in (self._parameters, self._buffers, self._modules):
            table.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name, array):
        """A non-learnable array saved with the model (e.g. batch norm running statistics)."""
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    # ---- traversal ------------------------------------------------------------------------
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}{name}.")

    def named_parameters(self):
        for prefix, m in self.named_modules():
            for name, p in m._parameters.items():
                yield prefix + name, p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for prefix, m in self.named_modules():
            for name, b in m._buffers.items():
                yield prefix + name, b

    # ---- modes and devices ----------------------------------------------------------------
    def train(self, mode=True):
        for _, m in self.named_modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def to(self, device):
        """Move parameters and buffers to "cpu" or "cuda" in place; returns self."""
        for _, m in self.named_modules():
            for name, p in m._parameters.items():
                p.data = to_device(p.data, device)
                p.grad = None if p.grad is None else to_device(p.grad, device)
            for name, b in list(m._buffers.items()):
                m.register_buffer(name, to_device(b, device))
        return self

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self):
        """name -> NumPy array copy, parameters and buffers."""
        out = collections.OrderedDict()
        for name, p in self.named_parameters():
            out[name] = to_device(p.data, "cpu").copy()
        for name, b in self.named_buffers():
            out[name] = np.array(to_device(b, "cpu"), copy=True)
        return out

    def load_state_dict(self, state, strict=True):
        """Copy arrays in by name.  Mis-shaped keys are always an error; missing and unexpected
        keys are an error when ``strict``.  Returns (missing, unexpected)."""
        own = dict(self.named_parameters())
        buffers = {}
        for prefix, m in self.named_modules():
            for name in m._buffers:
                buffers[prefix + name] = (m, name)
        state = {k: _as_array(v) for k, v in state.items()}
        missing = sorted(k for k in list(own) + list(buffers) if k not in state)
        unexpected = sorted(k for k in state if k not in own and k not in buffers)
        wrong = []
        for k, v in state.items():
            target = own[k].data if k in own else buffers[k][0]._buffers[buffers[k][1]] \
                if k in buffers else None
            if target is not None and tuple(np.shape(target)) != tuple(v.shape):
                wrong.append(f"{k}: expected {tuple(np.shape(target))}, got {tuple(v.shape)}")
        def listed(keys):  # a whole ResNet's worth of keys would bury the message
            more = f"; and {len(keys) - 6} more" if len(keys) > 6 else ""
            return "; ".join(keys[:6]) + more

        problems = []
        if wrong:
            problems.append(f"{len(wrong)} mis-shaped keys: {listed(wrong)}")
        if strict and missing:
            problems.append(f"{len(missing)} missing keys: {listed(missing)}")
        if strict and unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {listed(unexpected)}")
        if problems:
            raise ValueError("load_state_dict: " + " | ".join(problems))
        for k, v in state.items():
            if k in own:
                p = own[k]
                p.data = array_module(p.data).asarray(v, dtype=p.data.dtype).copy()
            elif k in buffers:
                m, name = buffers[k]
                old = m._buffers[name]
                m.register_buffer(name, array_module(old).asarray(v, dtype=np.asarray(
                    to_device(old, "cpu")).dtype).copy())
        return missing, unexpected


def _as_array(value):
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(to_device(value, "cpu"))


class Sequential(Module):
    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


class ModuleList(Module):
    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, m):
        setattr(self, str(len(self._modules)), m)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)


class Conv2d(Module):
    """Atrous convolution layer; He-normal weights (fan_out, as torchvision's ResNet)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, bias=True, init_std=None, rng=None):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if np.isscalar(kernel_size) else kernel_size
        rng = rng if rng is not None else np.random.default_rng()
        std = init_std if init_std is not None else math.sqrt(2.0 / (out_channels * kh * kw))
        self.weight = Parameter((rng.standard_normal((out_channels, in_channels, kh, kw)) *
                                 std).astype(np.float32))
        self.bias = Parameter(np.zeros(out_channels, np.float32)) if bias else None
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class BatchNorm2d(Module):
    """Batch norm; ``frozen``: always the running statistics, γ and β fixed (DeepLab trains
    ResNet this way, its batches being too small for good statistics).  ``relu`` fuses the
    ReLU that follows."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, frozen=False, relu=False):
        super().__init__()
        self.weight = Parameter(np.ones(num_features, np.float32))
        self.bias = Parameter(np.zeros(num_features, np.float32))
        self.register_buffer("running_mean", np.zeros(num_features, np.float32))
        self.register_buffer("running_var", np.ones(num_features, np.float32))
        self.register_buffer("num_batches_tracked", np.zeros((), np.int64))
        self.eps, self.momentum, self.relu = eps, momentum, relu
        self.freeze(frozen)

    def freeze(self, frozen=True):
        self.frozen = bool(frozen)
        self.weight.requires_grad = self.bias.requires_grad = not self.frozen
        return self

    def forward(self, x, residual=None):
        """bn(x), then (a ResNet block's end) ``+ residual``, then the ReLU if ``relu``."""
        training = self.training and not self.frozen
        if training:
            self.register_buffer("num_batches_tracked", self.num_batches_tracked + 1)
        if FUSE_BN_RELU:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training, self.momentum, self.eps, self.relu, residual)
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         training, self.momentum, self.eps)
        y = y if residual is None else y + residual
        return F.relu(y) if self.relu else y


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.padding, self.ceil_mode = padding, ceil_mode

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)
