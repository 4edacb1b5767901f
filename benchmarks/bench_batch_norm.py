"""Batch norm + ReLU kernels, the CPU ladder side by side: cpu_v1 (plain loops), cpu_v3 (the
same bits, four channels' sums at once) and cpu_v2 (sums reassociated), on the training step's
shapes, in turns in one process, with PyTorch's batch norm + ReLU for reference.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_batch_norm.py
"""
import tinydeeplab  # noqa: F401  (first: it sets the thread pools up before NumPy loads)

import argparse
import sys

import numba
import numpy as np

from tinydeeplab.benchmarks import add_timing_arguments
from tinydeeplab.benchmarks.bench_conv import block_times
from tinydeeplab.kernels import batch_norm as bn

# (N, C, H, W): the tiny model's stem and a block at 4 × 161², ResNet-101's layer1, layer3
# and layer4 at 1 × 321² (output stride 8)
SHAPES = [(4, 16, 81, 81), (4, 64, 41, 41), (1, 256, 81, 81), (1, 256, 41, 41),
          (1, 1024, 41, 41), (1, 2048, 41, 41)]
LADDER = ("cpu_v1", "cpu_v3", "cpu_v2")


def case(shape, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    return x, w, b, dy


def step(variant, x, w, b, dy):
    """Training-mode statistics, forward and backward with the fused ReLU."""
    impl = bn.VARIANTS[variant]
    mean, invstd = impl.stats(x, 1e-5)
    y = impl.forward(x, mean, invstd, w, b, True)
    return (mean, invstd, y) + impl.backward(dy, x, y, mean, invstd, w, True, True)


def torch_step(x, w, b, dy):
    """PyTorch's batch norm (training) + ReLU, forward and backward, for reference."""
    import torch

    xt = torch.from_numpy(x).requires_grad_()
    wt, bt = torch.from_numpy(w).requires_grad_(), torch.from_numpy(b).requires_grad_()
    y = torch.relu(torch.nn.functional.batch_norm(xt, None, None, wt, bt, True))
    return torch.autograd.grad(y, (xt, wt, bt), torch.from_numpy(dy))


def run(repeat=5, rounds=5, out=sys.stdout, shapes=SHAPES):
    print(f"# batch norm + ReLU, training (statistics, forward, backward), float32, "
          f"{numba.get_num_threads()} Numba threads", file=out)
    print(f"# ms: median of {rounds} rounds in turns (a block of {repeat} calls per variant); "
          "ratio: median of the per-round ratios to cpu_v1", file=out)
    try:
        import torch

        torch.set_num_threads(numba.get_num_threads())
        have_torch = True
    except ImportError:
        have_torch = False
        print("# PyTorch is not installed: no torch column", file=out)
    print("| shape | " + " | ".join(f"{v} ms" for v in LADDER) +
          (" | torch ms" if have_torch else "") +
          " | cpu_v3 / cpu_v1 | cpu_v2 / cpu_v1 | cpu_v3 = cpu_v1 bit for bit |", file=out)
    print("|---" * (2 * len(LADDER) + 2 + have_torch) + "|", file=out)
    for shape in shapes:
        args = case(shape)
        same = all(np.array_equal(a, c) for a, c in zip(step("cpu_v1", *args),
                                                        step("cpu_v3", *args)))
        fns = [lambda v=v: step(v, *args) for v in LADDER]
        if have_torch:
            fns.append(lambda: torch_step(*args))
        times = np.array(block_times(fns, repeat, rounds))
        ms = np.median(times, axis=0) * 1e3
        ratios = [np.median(times[:, i] / times[:, 0]) for i in (1, 2)]
        print(f"| {'×'.join(map(str, shape))} | " + " | ".join(f"{t:.3f}" for t in ms) +
              f" | {ratios[0]:.2f} | {ratios[1]:.2f} | {'yes' if same else 'NO'} |", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser, repeat=5, rounds=5, threads=False)
    args = parser.parse_args(argv)
    run(args.repeat, args.rounds)


if __name__ == "__main__":
    main()
