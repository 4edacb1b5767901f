"""Lesson 07: the splat, as loops over the points."""
import numpy as np

CHECK = "check_splat"


def splat(lattice, values):
    N, c = values.shape
    d1 = lattice.d + 1
    buf = np.zeros((lattice.M, c))
    for n in range(N):
        for k in range(d1):  # corner k of point n is vertex offsets[n·(d+1) + k]
            buf[lattice.offsets[n * d1 + k]] += lattice.bary[n, k] * values[n]
    return buf


def unweighted(lattice, values):
    N, c = values.shape
    d1 = lattice.d + 1
    buf = np.zeros((lattice.M, c))
    for n in range(N):
        for k in range(d1):
            buf[lattice.offsets[n * d1 + k]] += values[n]
    return buf


SOLUTION, MISTAKE = splat, unweighted
