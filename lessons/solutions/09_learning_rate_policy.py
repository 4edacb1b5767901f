"""Lesson 09: DeepLab v2's poly learning rate."""
CHECK = "check_poly_lr"


def poly_lr(base_lr, iteration, max_iter, power=0.9):
    return base_lr * (1 - iteration / max_iter) ** power


def linear_decay(base_lr, iteration, max_iter, power=0.9):
    return base_lr * (1 - iteration / max_iter)


SOLUTION, MISTAKE = poly_lr, linear_decay
