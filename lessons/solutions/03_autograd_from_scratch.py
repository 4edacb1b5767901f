"""Lesson 03: a Sigmoid Function with its backward."""
import numpy as np

from tinydeeplab import Function

CHECK = "check_sigmoid_function"


class Sigmoid(Function):
    @staticmethod
    def forward(ctx, x):
        y = 1 / (1 + np.exp(-x))
        ctx.save_for_backward(y)  # σ' = σ(1 − σ): the output is all backward needs
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return grad * y * (1 - y)


class SigmoidWithoutTheChainRule(Sigmoid):
    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return y * (1 - y)  # forgot to multiply by the incoming gradient


SOLUTION, MISTAKE = Sigmoid, SigmoidWithoutTheChainRule
