"""Lesson 01: the output size of a dilated convolution."""
CHECK = "check_output_size"


def output_size(H, k, s, pad, d):
    # the last tap of the dilated kernel sits d·(k − 1) pixels after the first
    return (H + 2 * pad - d * (k - 1) - 1) // s + 1


def forgot_the_dilation(H, k, s, pad, d):
    return (H + 2 * pad - k) // s + 1


SOLUTION, MISTAKE = output_size, forgot_the_dilation
