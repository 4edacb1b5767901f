"""gradcheck itself: passes on a correct backward, fails loudly (with the place) on a wrong one."""
import numpy as np
import pytest

from tinydeeplab import Function, GradcheckError, Tensor, gradcheck


class WrongSquare(Function):
    """x², with a backward that is wrong for one element only."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        g = 2 * x * grad
        g.reshape(-1)[4] *= 1.5  # the deliberate mistake, at flat index 4 = (1, 1)
        return g


def test_gradcheck_passes_on_a_correct_backward():
    x = Tensor(np.random.default_rng(0).standard_normal((3, 3)), requires_grad=True)
    assert gradcheck(lambda t: t * t, [x])


def test_gradcheck_fails_on_a_wrong_backward_and_names_the_element():
    x = Tensor(np.random.default_rng(0).standard_normal((3, 3)) + 3, requires_grad=True)
    with pytest.raises(GradcheckError, match=r"input 0 .* element \(1, 1\).*analytic.*numeric"):
        gradcheck(WrongSquare.apply, [x])
    assert gradcheck(WrongSquare.apply, [x], raise_exception=False) is False


def test_gradcheck_random_direction_catches_errors_in_unsampled_elements():
    # max_elements=1 samples one element; the random-direction check still sees the mistake.
    x = Tensor(np.random.default_rng(0).standard_normal((3, 3)) + 3, requires_grad=True)
    with pytest.raises(GradcheckError):
        for seed in range(5):  # whichever element is sampled, the direction check must fire
            gradcheck(WrongSquare.apply, [x], max_elements=1, seed=seed)


def test_gradcheck_wants_float64():
    x = Tensor(np.ones((2, 2), dtype=np.float32), requires_grad=True)
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda t: t * t, [x])
