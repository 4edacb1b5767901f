"""Stochastic gradient descent with momentum and weight decay (the DeepLab v2 optimiser).

Caffe's update, which DeepLab uses:  v ← μ·v + lr·(g + λ·θ);  θ ← θ − v.
"""
from .autograd import no_grad


class SGD:
    def __init__(self, params, lr, momentum=0.9, weight_decay=5e-4):
        """``params``: tensors, or dicts {"params": [...], "lr_mult": m, "weight_decay": λ}
        (parameter groups, e.g. the DeepLab head at 10× the learning rate)."""
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [{"params": params}]
        self.groups = []
        for group in params:
            group = {"lr_mult": 1.0, "weight_decay": weight_decay, **group}
            group["params"] = list(group["params"])
            for p in group["params"]:
                if not p.requires_grad:
                    raise ValueError("SGD was given a tensor that does not require grad")
            self.groups.append(group)
        self.lr, self.momentum = lr, momentum
        self.velocity = {}

    def zero_grad(self):
        for group in self.groups:
            for p in group["params"]:
                p.grad = None

    def step(self):
        with no_grad():
            for group in self.groups:
                lr = self.lr * group["lr_mult"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g = p.grad + group["weight_decay"] * p.data if group["weight_decay"] \
                        else p.grad
                    v = self.velocity.get(id(p))
                    v = lr * g if v is None else self.momentum * v + lr * g
                    self.velocity[id(p)] = v
                    p.data -= v
