"""The ASPP head, forward + backward: one convolution against branch by branch and PyTorch.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_aspp.py [--rounds R]

The head sums four 3×3 classifiers at rates 6, 12, 18, 24 on the same features.  Per shape, in
turns (``bench_conv.block_times``): ours as one convolution (``kernels/aspp.py``, "stacked",
the library's CPU default), ours branch by branch ("sum": four ``F.conv2d``s, their outputs
and input gradients added) and PyTorch's four ``F.conv2d``s summed, float32, forward, then the
backward of every input and weight.  Times: the median over rounds; ratios: the median of the
per-round ratios [range].
"""
import argparse
import sys

import tinydeeplab  # noqa: F401  first: thread set-up before NumPy (tinydeeplab/_threads.py)
import numpy as np

from tinydeeplab.benchmarks import add_timing_arguments, cpu_ticks, print_steal_line

RATES = (6, 12, 18, 24)
SHAPES = [  # (N, C, H, W), K: ResNet's head at 321² crops, the tiny network's at 161², the demo's
    ((1, 2048, 41, 41), 21),
    ((4, 128, 21, 21), 21),
    ((4, 128, 15, 15), 5),
]


def _functions(shape, K, threads, seed=0):
    import torch

    from tinydeeplab.kernels import aspp

    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    ws = [rng.standard_normal((K, shape[1], 3, 3), dtype=np.float32) * 0.01 for _ in RATES]
    bs = [np.zeros(K, np.float32) for _ in RATES]
    dy = rng.standard_normal((shape[0], K, *shape[2:]), dtype=np.float32)

    def ours(variant):
        def step():
            aspp.aspp_forward(x, ws, bs, RATES, variant=variant)
            aspp.aspp_backward(x, ws, dy, RATES, variant=variant)
        return step

    xt = torch.tensor(x, requires_grad=True)
    wt = [torch.tensor(w, requires_grad=True) for w in ws]
    bt = [torch.tensor(b, requires_grad=True) for b in bs]
    dyt = torch.tensor(dy)

    def theirs():
        y = sum(torch.nn.functional.conv2d(xt, w, b, padding=r, dilation=r)
                for w, b, r in zip(wt, bt, RATES))
        xt.grad = None
        for t in wt + bt:
            t.grad = None
        y.backward(dyt)

    return ours("stacked"), ours("sum"), theirs


def run(threads=None, repeat=3, rounds=5, shapes=SHAPES, out=sys.stdout):
    import os

    from threadpoolctl import threadpool_limits

    from tinydeeplab.benchmarks.bench_conv import blas_info, block_times, gemm_gflops

    threads = threads or os.cpu_count()
    ticks = cpu_ticks()
    print(f"# ASPP head (rates {', '.join(map(str, RATES))}) forward+backward, float32, CPU, "
          f"{threads} threads; BLAS: {blas_info()}", file=out)
    with threadpool_limits(limits=threads, user_api="blas"):
        print(f"# NumPy sgemm 1024³ roofline: {gemm_gflops(threads):.1f} GFLOP/s (the host's "
              "speed at the start)", file=out)
    print(f"# {rounds} rounds in turns; times: median of the rounds; ratios: median of the "
          "per-round ratios [range]", file=out)
    print("| input (N,C,H,W) | K | one conv ms | branch by branch ms | torch ms | "
          "one conv / torch | one conv / branch by branch |", file=out)
    print("|---|---|---|---|---|---|---|", file=out)
    results = []
    with threadpool_limits(limits=threads, user_api="blas"):
        for shape, K in shapes:
            t = np.array(block_times(list(_functions(shape, K, threads)), repeat, rounds))
            vs_torch, vs_sum = t[:, 0] / t[:, 2], t[:, 0] / t[:, 1]
            med = np.median(t, axis=0) * 1e3
            print(f"| {shape} | {K} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} | "
                  f"{np.median(vs_torch):.2f} [{vs_torch.min():.2f}-{vs_torch.max():.2f}] | "
                  f"{np.median(vs_sum):.2f} [{vs_sum.min():.2f}-{vs_sum.max():.2f}] |",
                  file=out)
            results.append((float(np.median(vs_torch)), float(np.median(vs_sum))))
    print_steal_line(ticks, out)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser, repeat=3, rounds=5)
    args = parser.parse_args(argv)
    run(args.threads, args.repeat, args.rounds)


if __name__ == "__main__":
    main()
