"""Check a backward against central finite differences, in float64.

For a function ``y = fn(*inputs)`` we draw a fixed random cotangent ``v`` (same shape as ``y``)
and study the scalar ``L(x) = <fn(x), v>``.  Its gradient is exactly the vector-Jacobian product
that ``backward(v)`` computes, so comparing the two checks the whole Jacobian against ``v``:

* element by element: ``dL/dx_i ≈ (L(x + ε e_i) − L(x − ε e_i)) / 2ε`` for every element of every
  input (inputs up to ``max_elements`` elements, otherwise a random sample of them);
* along a random direction ``u`` over all inputs at once:
  ``<∇L, u> ≈ (L(x + ε u) − L(x − ε u)) / 2ε``, which also covers large inputs.

The central difference has error O(ε²), so with ε = 1e-6 in float64 the agreement is to about
1e-8 relative for smooth functions; ``atol``/``rtol`` leave room for kinks nearby.
"""
import numpy as np

from .autograd import Tensor
from .backend import array_module, to_device


class GradcheckError(AssertionError):
    pass


def _loss(fn, inputs, v):
    out = fn(*inputs)
    return float((out.data * v).sum())


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, seed=0, max_elements=4096,
              raise_exception=True):
    """True when every analytic gradient of ``fn`` at ``inputs`` matches finite differences.

    ``inputs``: Tensors; those with ``requires_grad=True`` are checked and must be float64.
    On a mismatch raises ``GradcheckError`` (or returns False with ``raise_exception=False``)
    naming the input, the element index, and both values.
    """
    inputs = [t if isinstance(t, Tensor) else Tensor(t) for t in inputs]
    checked = [i for i, t in enumerate(inputs) if t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(
                f"gradcheck: input {i} has dtype {inputs[i].dtype}; finite differences need "
                "float64 inputs"
            )
    for i in checked:  # finite differences perturb the data in place through a flat view
        if not inputs[i].data.flags.c_contiguous:  # (ascontiguousarray would make 0-d 1-d)
            inputs[i].data = array_module(inputs[i].data).ascontiguousarray(inputs[i].data)
    rng = np.random.default_rng(seed)

    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(out).__name__}")
    xp = array_module(out.data)
    v = xp.asarray(rng.standard_normal(out.shape))
    for i in checked:
        inputs[i].grad = None
    out.backward(v)
    analytic = {}
    for i in checked:
        g = inputs[i].grad
        analytic[i] = np.zeros(inputs[i].shape) if g is None else to_device(g, "cpu")

    def fail(message):
        if raise_exception:
            raise GradcheckError(message)
        return False

    # 1. element by element
    for i in checked:
        data = inputs[i].data
        flat = data.reshape(-1)  # a view: writing to it perturbs the input in place
        n = flat.size
        picks = range(n) if n <= max_elements else rng.choice(n, max_elements, replace=False)
        for k in picks:
            k = int(k)
            orig = float(flat[k])
            flat[k] = orig + eps
            plus = _loss(fn, inputs, v)
            flat[k] = orig - eps
            minus = _loss(fn, inputs, v)
            flat[k] = orig
            numeric = (plus - minus) / (2 * eps)
            a = float(analytic[i].reshape(-1)[k])
            if not abs(a - numeric) <= atol + rtol * abs(numeric):
                index = np.unravel_index(k, data.shape)
                return fail(
                    f"gradcheck: input {i} (shape {data.shape}) element {tuple(map(int, index))}:"
                    f" analytic {a:.10g} vs numeric {numeric:.10g} "
                    f"(|diff| {abs(a - numeric):.3g} > atol {atol} + rtol {rtol} * |numeric|)"
                )

    # 2. one random direction through all inputs at once
    directions = {i: xp.asarray(rng.standard_normal(inputs[i].shape)) for i in checked}
    saved = {i: inputs[i].data.copy() for i in checked}
    for i in checked:
        inputs[i].data[...] = saved[i] + eps * directions[i]
    plus = _loss(fn, inputs, v)
    for i in checked:
        inputs[i].data[...] = saved[i] - eps * directions[i]
    minus = _loss(fn, inputs, v)
    for i in checked:
        inputs[i].data[...] = saved[i]
    numeric = (plus - minus) / (2 * eps)
    a = float(sum((analytic[i] * to_device(directions[i], "cpu")).sum() for i in checked))
    if not abs(a - numeric) <= atol + rtol * abs(numeric):
        return fail(
            f"gradcheck: random-direction vector-Jacobian product: analytic {a:.10g} vs "
            f"numeric {numeric:.10g}"
        )
    return True
