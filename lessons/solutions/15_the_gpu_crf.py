"""Lesson 15: number the lattice's vertices by sorting the keys, as the GPU lattice does."""
import numpy as np

CHECK = "check_number_by_sorting"


def number_by_sorting(keys):
    order = np.lexsort(keys.T[::-1])  # first coordinate first
    ordered = keys[order]
    new = np.ones(len(keys), bool)
    new[1:] = (ordered[1:] != ordered[:-1]).any(1)
    vertex = np.empty(len(keys), np.int64)
    vertex[order] = np.cumsum(new) - 1
    return vertex, int(new.sum())


def first_coordinate_only(keys):
    """Sorts and compares on the first coordinate alone: keys that share it merge."""
    order = np.argsort(keys[:, 0], kind="stable")
    ordered = keys[order]
    new = np.ones(len(keys), bool)
    new[1:] = ordered[1:, 0] != ordered[:-1, 0]
    vertex = np.empty(len(keys), np.int64)
    vertex[order] = np.cumsum(new) - 1
    return vertex, int(new.sum())


SOLUTION, MISTAKE = number_by_sorting, first_coordinate_only
