"""What every kernel module shares: choosing a variant, importing CUDA code lazily, launching
one-thread-per-element CUDA kernels."""
import math

import numpy as np

from tinydeeplab.backend import on_gpu

THREADS = 128  # per block, for the one-thread-per-element kernels


def lazy(module, name):
    """``kernels.<module>.<name>``, imported on first call: numba.cuda reads
    NUMBA_ENABLE_CUDASIM when it is first imported, and CPU users never need it."""
    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), name)(*args, **kwargs)

    call.__name__ = name
    return call


def pick(variants, default, x, variant=None):
    """The registry entry to run: ``variant`` if given, else the default for x's device."""
    name = variant or default["cuda" if on_gpu(x) else "cpu"]
    if name not in variants:
        raise ValueError(f"variant must be one of {sorted(variants)}, got {variant!r}")
    return variants[name]


def launch(kernel, count, *args):
    """Run a CUDA kernel with one thread per element for ``count`` elements."""
    if count > 0:
        kernel[math.ceil(count / THREADS), THREADS](*args)


def int_pair(value, name, minimum, op):
    """An int or (h, w) pair of ints ≥ ``minimum`` as a tuple; a ValueError naming ``op``,
    the argument and its value otherwise."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and \
            type(value[1]) is int and value[0] >= minimum and value[1] >= minimum:
        return value  # the common cases, checked first: this runs for every kernel call
    if type(value) is int and value >= minimum:
        return value, value
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{op}: {name} must be {what}, got {value!r}")
    return tuple(int(v) for v in pair)
