"""Lesson 3 — Autograd from scratch: Tensor, Function, topological order, accumulation.

You will learn:
  * how a ``Function`` pairs a forward (arrays in, array out) with a backward (output
    gradient in, one gradient per input out), and how ``apply`` records the graph;
  * why ``backward`` visits the nodes in reverse topological order, and how a tensor used
    twice receives the *sum* of its gradients;
  * how to write a new differentiable op and prove its backward right with ``gradcheck``
    (finite differences), which also catches a wrong one;
  * that the same chain rule, applied by PyTorch, gives the same numbers.

Run:  python lessons/03_autograd_from_scratch.py   (TDL_FAST=1 changes nothing here: it is quick)
"""
# %% Setup
import inspect
import os

import tinydeeplab  # noqa: F401  first: its thread set-up must precede NumPy's (README)
import numpy as np

import tinydeeplab.functional as F
from tinydeeplab import Function, Tensor, exercises, gradcheck, lessons

OUT = lessons.output_dir()  # figures and runs: $TDL_OUT, else ./lesson_out
rng = np.random.default_rng(0)

# %% 1. A graph is recorded as you compute
# Each result remembers the Function that made it (``creator``) and the tensors it was made
# from (``inputs``: the graph's edges); leaves (your inputs and parameters) have neither.
# Here: loss = Σ (relu(x·w) + x·w)  — the product is used twice.
x = Tensor(rng.standard_normal((3, 4)), requires_grad=True)
w = Tensor(rng.standard_normal((4, 2)), requires_grad=True)
h = x @ w
loss = (h.relu() + h).sum()


def describe(t, names):
    return names.get(id(t), t.creator.__name__ if t.creator else "leaf")


names = {id(x): "x", id(w): "w", id(h): "h = x @ w", id(loss): "loss"}
order = loss.topological_order()
print("topological order (inputs before the nodes that use them):")
for t in order:
    print(f"  {describe(t, names):>10s}  <- {[describe(i, names) for i in t.inputs]}")
# The engine's own code (tinydeeplab/autograd.py): a depth-first walk that appends a node only
# after all of its inputs — a topological order — which backward then walks in reverse.
print(inspect.getsource(Tensor.topological_order))

# %% 2. Backward: reverse topological order, gradients summed
# Walking the list backwards guarantees that when we reach h, *both* of its consumers (relu and
# the addition) have already sent their gradient: h.grad = 1[h > 0] + 1, then x.grad = that @ wᵀ.
loss.backward()
dh = (h.data > 0) + 1.0
print("x.grad equals (1[h>0] + 1) @ wᵀ:", np.allclose(x.grad, dh @ w.data.T))
print("w.grad equals xᵀ @ (1[h>0] + 1):", np.allclose(w.grad, x.data.T @ dh))

# %% 3. A new op: the smooth "softplus"  y = log(1 + eˣ),  dy/dx = sigmoid(x)
# forward saves what backward needs; backward multiplies the incoming gradient by the local
# derivative (the chain rule, one node at a time).


class Softplus(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return np.logaddexp(0, x)  # log(1 + eˣ) without overflow

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        return grad / (1 + np.exp(-x))


class WrongSoftplus(Softplus):
    @staticmethod
    def backward(ctx, grad):  # a classic slip: the derivative of log(1 + eˣ) is *not* eˣ
        (x,) = ctx.saved
        return grad * np.exp(x) / 2


z = Tensor(rng.standard_normal((5, 7)), requires_grad=True)
good = gradcheck(lambda z: Softplus.apply(z), [z])
wrong = gradcheck(lambda z: WrongSoftplus.apply(z), [z], raise_exception=False)
print(f"gradcheck: Softplus {good}, WrongSoftplus {wrong}")

# %% 4. The same chain rule in PyTorch (when installed)
try:
    import torch

    xt = torch.tensor(x.data, requires_grad=True)
    wt = torch.tensor(w.data, requires_grad=True)
    ht = xt @ wt
    (torch.relu(ht) + ht).sum().backward()
    same_as_torch = np.allclose(xt.grad.numpy(), x.grad) and np.allclose(wt.grad.numpy(), w.grad)
    print("same gradients as PyTorch:", same_as_torch)
except ImportError:
    same_as_torch = True
    print("PyTorch is not installed (pip install torch): comparison skipped")

# %% 5. Gradient descent with it: fit a softmax classifier with cross-entropy
# The pieces DeepLab's training uses, at toy size: F.cross_entropy(logits, labels), backward,
# an update under no_grad.  We draw the loss curve.
from tinydeeplab import no_grad  # noqa: E402

points = rng.standard_normal((200, 2))
labels = (points[:, 0] * points[:, 1] > 0).astype(np.int64)  # XOR-like quadrants
features = Tensor(np.concatenate([points, points[:, :1] * points[:, 1:]], axis=1))
W = Tensor(np.zeros((3, 2)), requires_grad=True)
bias = Tensor(np.zeros(2), requires_grad=True)
losses = []
for step in range(100):
    logits = features @ W + bias
    loss_t = F.cross_entropy(logits, labels)
    W.grad = bias.grad = None
    loss_t.backward()
    with no_grad():
        W.data -= 0.5 * W.grad
        bias.data -= 0.5 * bias.grad
    losses.append(loss_t.item())
accuracy = float(((features @ W + bias).numpy().argmax(1) == labels).mean())
print(f"cross-entropy {losses[0]:.3f} -> {losses[-1]:.3f}, accuracy {accuracy:.2f}")

import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
ax[0].plot(losses)
ax[0].set_xlabel("step")
ax[0].set_ylabel("cross-entropy")
ax[0].set_title("gradient descent with our autograd", fontsize=9)
place = {id(t): (0.5 + 0.28 * ((depth % 3) - 1), 1 - (depth + 0.5) / len(order))
         for depth, t in enumerate(order)}  # top: first in topological order
for t in order:  # the edges: an arrow from each input to the node made from it
    for i in t.inputs:
        ax[1].annotate("", xy=place[id(t)], xytext=place[id(i)],
                       arrowprops=dict(arrowstyle="->", color="tab:blue", lw=0.8))
for t in order:
    ax[1].text(*place[id(t)], describe(t, names), ha="center", va="center",
               bbox=dict(boxstyle="round", fc="w"), fontsize=8)
ax[1].set_title("the graph, edges from inputs to results (top: first)", fontsize=9)
ax[1].axis("off")
fig.savefig(os.path.join(OUT, "03_autograd.png"), dpi=90, bbox_inches="tight")
plt.close(fig)

# %% Check
assert [describe(t, names) for t in order][-1] == "loss" and order.index(h) < len(order) - 1
assert all(order.index(i) < order.index(t) for t in order for i in t.inputs), "inputs first"
assert np.allclose(x.grad, dh @ w.data.T) and np.allclose(w.grad, x.data.T @ dh)
assert good and not wrong, "gradcheck must accept the right backward and reject the wrong one"
assert same_as_torch
assert losses[-1] < 0.5 * losses[0] and accuracy > 0.9
print("Check passed.")

# %% Exercise — a Sigmoid op (a solution: lessons/solutions/03_autograd_from_scratch.py)
# Write σ(x) = 1 / (1 + e^−x) as a Function: forward saves what backward needs, backward
# returns grad · σ'(x).  The check runs gradcheck on it (and a wrong backward fails).
class Sigmoid(Function):
    @staticmethod
    def forward(ctx, x):
        raise NotImplementedError("your code here")

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("your code here")


exercises.run(exercises.check_sigmoid_function, Sigmoid)

# %% Summary — read next
# * A Function pairs forward and backward; apply records creator and inputs, so every result
#   knows its graph.
# * backward walks a topological order in reverse and sums the gradients of a tensor used
#   twice; gradcheck (finite differences) accepts a right backward and rejects a wrong one.
# Next: lesson 02, which writes the backward of the convolution by hand (kernels track 03 → 02).
