"""Lesson 16: a paired verdict, the mean difference against its spread over seeds."""
import numpy as np

CHECK = "check_paired_verdict"


def verdict(differences):
    d = np.asarray(differences, float)
    if d.size < 2:
        return "neither"
    if d.mean() > d.std():
        return "first"
    if d.mean() < -d.std():
        return "second"
    return "neither"


def mean_only(differences):
    """Reads the sign of the mean alone: noise then always picks a side."""
    d = np.asarray(differences, float)
    return "first" if d.mean() > 0 else "second" if d.mean() < 0 else "neither"


SOLUTION, MISTAKE = verdict, mean_only
