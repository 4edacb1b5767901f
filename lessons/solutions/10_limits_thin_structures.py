"""Lesson 10: the appearance (bilateral) kernel's weight for one pair of pixels."""
import numpy as np

CHECK = "check_bilateral_weight"


def bilateral_weight(p_i, p_j, I_i, I_j, sxy, srgb):
    dp, dI = np.asarray(p_i) - p_j, np.asarray(I_i) - I_j
    return np.exp(-(dp @ dp) / (2 * sxy ** 2) - (dI @ dI) / (2 * srgb ** 2))


def without_the_halves(p_i, p_j, I_i, I_j, sxy, srgb):
    dp, dI = np.asarray(p_i) - p_j, np.asarray(I_i) - I_j
    return np.exp(-(dp @ dp) / sxy ** 2 - (dI @ dI) / srgb ** 2)


SOLUTION, MISTAKE = bilateral_weight, without_the_halves
