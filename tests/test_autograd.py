"""The autograd engine: graph order, accumulation, no_grad, detach, devices, clear errors."""
import numpy as np
import pytest

import tinydeeplab as tdl
from tinydeeplab import Tensor, no_grad


def test_reused_node_accumulates_gradients():
    x = Tensor(np.array([2.0, -3.0]), requires_grad=True)
    y = x * x + x  # x is used three times
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 1)


def test_diamond_graph_visits_each_node_once():
    x = Tensor(np.array(1.5), requires_grad=True)
    a = x * 2
    b = a * a + a * 3  # a feeds two branches
    b.backward()
    # db/dx = (2a + 3) · 2 with a = 3
    assert x.grad == pytest.approx((2 * 3.0 + 3) * 2)


def test_leaf_gradients_accumulate_across_backward_calls():
    x = Tensor(np.ones(3), requires_grad=True)
    (x * 2).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, [5.0, 5.0, 5.0])


def test_deep_chain_does_not_hit_the_recursion_limit():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0
    y.backward()
    assert x.grad == 1.0


def test_requires_grad_propagates_and_no_grad_stops_it():
    a = Tensor(np.ones(2), requires_grad=True)
    b = Tensor(np.ones(2))
    assert (a + b).requires_grad and not (b + b).requires_grad
    with no_grad():
        c = a * 2
    assert not c.requires_grad and tdl.is_grad_enabled()


def test_detach_cuts_the_graph():
    a = Tensor(np.ones(2), requires_grad=True)
    d = (a * 2).detach()
    assert not d.requires_grad
    np.testing.assert_array_equal(d.numpy(), [2.0, 2.0])


def test_backward_on_non_scalar_needs_a_gradient():
    a = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"shape \(2, 3\).*grad="):
        (a * 2).backward()
    (a * 2).backward(np.ones((2, 3)))
    np.testing.assert_array_equal(a.grad, np.full((2, 3), 2.0))


def test_integer_tensors_cannot_require_grad():
    with pytest.raises(TypeError, match="int64"):
        Tensor(np.arange(3), requires_grad=True)


def test_adding_incompatible_shapes_names_both():
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4,\)"):
        Tensor(np.ones((2, 3))) + Tensor(np.ones(4))


def test_matmul_shape_errors_are_clear():
    with pytest.raises(ValueError, match="inner dimensions"):
        Tensor(np.ones((2, 3))) @ Tensor(np.ones((2, 3)))


def test_scalars_keep_the_tensor_dtype():
    a = Tensor(np.ones(2, dtype=np.float32), requires_grad=True)
    y = 2.5 * a - 1 + a / 3
    assert y.dtype == np.float32
    y.sum().backward()
    assert a.grad.dtype == np.float32


def test_numpy_and_to_cpu():
    a = Tensor(np.arange(3.0))
    assert a.to("cpu") is a
    assert isinstance(a.numpy(), np.ndarray) and a.device == "cpu"


def test_to_cuda_without_a_gpu_says_how_to_get_one():
    if tdl.has_cuda():
        a = Tensor(np.arange(3.0), requires_grad=True)
        b = a.to("cuda")
        assert b.device == "cuda"
        (b * b).sum().backward()
        np.testing.assert_allclose(a.grad, 2 * np.arange(3.0))
    else:
        with pytest.raises(RuntimeError, match=r"tinydeeplab\[cuda\]"):
            Tensor(np.arange(3.0)).to("cuda")


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        Tensor(np.arange(3.0)).to("tpu")


def test_array_module_is_numpy_for_numpy_arrays():
    assert tdl.array_module(np.ones(2)) is np
    assert tdl.array_module(3.0) is np
