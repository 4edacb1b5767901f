"""Lesson 06: nearest-neighbour resizing of label maps."""
import numpy as np

CHECK = "check_resize_labels"


def resize_labels(labels, size):
    B, H, W = labels.shape
    h, w = size
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(int), H - 1)  # pixel centres
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(int), W - 1)
    return labels[:, rows[:, None], cols[None, :]]


def sampled_at_corners(labels, size):
    B, H, W = labels.shape
    h, w = size
    rows = (np.arange(h) * H // h)
    cols = (np.arange(w) * W // w)
    return labels[:, rows[:, None], cols[None, :]]


SOLUTION, MISTAKE = resize_labels, sampled_at_corners
