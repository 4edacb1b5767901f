"""Lesson 02: the weight gradient of a dilated convolution, without im2col."""
import numpy as np

CHECK = "check_weight_gradient"


def weight_gradient(x, dy, kh, kw, s, pad, d):
    # dw[k,c,p,q] = Σ_{n,i,j} dy[n,k,i,j] · x[n, c, i·s − pad + p·d, j·s − pad + q·d]
    N, C, H, W = x.shape
    Ho, Wo = dy.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dw = np.zeros((dy.shape[1], C, kh, kw))
    for p in range(kh):
        for q in range(kw):
            patch = xp[:, :, p * d: p * d + s * (Ho - 1) + 1: s,
                       q * d: q * d + s * (Wo - 1) + 1: s]  # (N, C, Ho, Wo)
            dw[:, :, p, q] = np.einsum("nkij,ncij->kc", dy, patch)
    return dw


def ignored_the_stride(x, dy, kh, kw, s, pad, d):
    return weight_gradient(x, dy, kh, kw, 1, pad, d) if s == 1 else \
        weight_gradient(x[:, :, ::s, ::s], dy, kh, kw, 1, pad, d)


SOLUTION, MISTAKE = weight_gradient, ignored_the_stride
