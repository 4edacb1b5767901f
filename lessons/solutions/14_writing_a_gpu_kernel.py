"""Lesson 14: entry (r, m) of dY_col, the implicit matrix of the input gradient."""
CHECK = "check_dy_col"


def dy_col(dy, r, m, kh, kw, s, pad, d, H, W):
    k, p, q = r // (kh * kw), (r // kw) % kh, r % kw
    v, h, n = m % W, (m // W) % H, m // (W * H)
    th, tv = h + pad - p * d, v + pad - q * d  # i·s = h + pad − p·d, likewise for j
    if th < 0 or tv < 0 or th % s or tv % s:
        return 0.0  # no output read (h, v) through this tap
    i, j = th // s, tv // s
    if i >= dy.shape[2] or j >= dy.shape[3]:
        return 0.0
    return dy[n, k, i, j]


def without_stride_test(dy, r, m, kh, kw, s, pad, d, H, W):
    """Divides without asking whether the division is exact: wrong whenever s > 1."""
    k, p, q = r // (kh * kw), (r // kw) % kh, r % kw
    v, h, n = m % W, (m // W) % H, m // (W * H)
    i, j = (h + pad - p * d) // s, (v + pad - q * d) // s
    if h + pad - p * d < 0 or v + pad - q * d < 0 or i >= dy.shape[2] or j >= dy.shape[3]:
        return 0.0
    return dy[n, k, i, j]


SOLUTION, MISTAKE = dy_col, without_stride_test
