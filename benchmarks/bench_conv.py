"""Forward + backward of F.conv2d against PyTorch on DeepLab-like shapes, in one process.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_conv.py [--threads T]

Per shape: our time and torch's (the best of --rounds blocks of --repeat runs, median within
a block, each block after a pause and a warm-up that also compiles the Numba kernels), the
ratio (the median of the rounds' ratios, with their range: ours and torch run in turns, so a
ratio compares runs made seconds apart on a machine whose speed drifts), our GFLOP/s, and
NumPy's single-precision GEMM GFLOP/s on this machine as the roofline (the im2col path can at
best run at GEMM speed).  ``--against VARIANT`` also times ours with another rung of the
ladder in the same rounds and gives the default's time over that rung's.
FLOPs of one forward: 2·N·K·Ho·Wo·C·kh·kw; the backward costs twice that (dx and dw).
``--batch N`` runs every shape at batch N (DeepLab trains at 10).  On the GPU, cuDNN runs with
TF32 off (PyTorch's default lets cuDNN use it), float32 like ours.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import tinydeeplab  # noqa: F401  first: thread set-up before NumPy (tinydeeplab/_threads.py)
import numpy as np

from tinydeeplab.benchmarks import add_timing_arguments, cpu_ticks, positive_int, print_steal_line


SHAPES = [  # (N, C, H, W) -> K, kernel, dilation (padding = dilation·(k−1)/2, stride 1)
    ((2, 64, 65, 65), 64, 3, 1),
    ((2, 128, 65, 65), 128, 3, 2),
    ((1, 256, 41, 41), 256, 3, 2),
    ((1, 512, 41, 41), 512, 3, 4),
    ((1, 2048, 41, 41), 21, 3, 6),
    ((1, 2048, 41, 41), 21, 3, 12),
    ((1, 2048, 41, 41), 21, 3, 18),
    ((1, 2048, 41, 41), 21, 3, 24),
    ((1, 1024, 41, 41), 256, 1, 1),
]


def median_time(fn, repeat):
    fn()  # warm-up (and JIT compilation)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def block_times(fns, repeat, rounds, pause=0.3):
    """Per-round median times, ``times[r][i]`` for function i in round r.  Functions are timed
    in blocks (a×repeat, b×repeat, a×repeat, ...); each block starts after a pause and a
    warm-up call, so the other library's thread pool has gone idle: spinning OpenMP/BLAS
    workers left over from one library would otherwise slow the other, whichever runs second.
    The ratio of two functions within one round is robust to the slow drifts of a shared
    machine's speed (±30 % over minutes on ours)."""
    times = []
    for _ in range(rounds):
        row = []
        for fn in fns:
            time.sleep(pause)
            row.append(median_time(fn, repeat))
        times.append(row)
    return times


def median_times_in_blocks(fns, repeat, rounds=2, pause=0.3):
    """Best-of-``rounds`` median time of each function, timed as in ``block_times``."""
    return [min(column) for column in zip(*block_times(fns, repeat, rounds, pause))]


def gemm_gflops(threads, n=1024, repeat=5):
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    t = median_time(lambda: a @ a, repeat)
    return 2 * n**3 / t / 1e9


def blas_info():
    from threadpoolctl import threadpool_info

    rows = [f"{i['internal_api']} {i.get('version')} ({i.get('architecture')}, "
            f"{i['num_threads']} threads)" for i in threadpool_info()
            if i["user_api"] == "blas"]
    from tinydeeplab import _threads

    return ("; ".join(rows) or "unknown") + "\n# threads: " + _threads.describe()


def quiet_small_grid_warnings():
    """Numba warns at every CUDA launch of fewer than 128 blocks (small layers, the CRF's
    one-channel normalisation filters); printed between a table's rows, they would break it."""
    import warnings

    warnings.filterwarnings("ignore", message=".*will likely result in GPU under-utilization")


def _check_variant(atrous_conv, variant, device, option):
    if atrous_conv.VARIANTS.get(variant, None) is None or \
            atrous_conv.VARIANTS[variant].device != device:
        names = sorted(v for v, spec in atrous_conv.VARIANTS.items() if spec.device == device)
        raise SystemExit(f"{option} must be one of the {device} variants {names}")


def run(device="cpu", threads=None, repeat=5, shapes=SHAPES, out=sys.stdout, variant=None,
        rounds=4, against=None):
    import torch  # first, so that its OpenMP runtime keeps its own defaults
    from threadpoolctl import threadpool_limits

    import numba
    import tinydeeplab.functional as F
    from tinydeeplab import Tensor

    from tinydeeplab.kernels import atrous_conv

    if variant is not None:  # ours with another rung of the ladder than the default
        _check_variant(atrous_conv, variant, device, "--variant")
        atrous_conv.DEFAULT[device] = variant
    if against is not None:
        _check_variant(atrous_conv, against, device, "--against")
    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    tdev = "cuda" if device == "cuda" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        import cupy

        quiet_small_grid_warnings()
        csync = cupy.cuda.Device().synchronize
        torch.backends.cudnn.allow_tf32 = False  # like for like: ours is float32 throughout
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        csync = lambda: None  # noqa: E731

    ticks = cpu_ticks()
    with threadpool_limits(limits=threads, user_api="blas"):
        roof = gemm_gflops(threads) if device == "cpu" else float("nan")
        print(f"# atrous conv forward+backward, float32, device={device}, threads={threads}, "
              f"ours: {atrous_conv.DEFAULT[device]}", file=out)
        print(f"# {platform.processor() or platform.machine()}; BLAS: {blas_info()}", file=out)
        if device == "cpu":
            print(f"# NumPy sgemm 1024³ roofline: {roof:.1f} GFLOP/s", file=out)
        else:
            print(f"# {torch.cuda.get_device_name()}; cuDNN {torch.backends.cudnn.version()}, "
                  "TF32 off", file=out)
        ours_name = atrous_conv.DEFAULT[device]
        extra = f" {ours_name}/{against} |" if against else ""
        print(f"# {rounds} rounds in turns; times: best round; ratios: median of the rounds' "
              "[range]", file=out)
        print("| input (N,C,H,W) | K | k | d | ours ms | torch ms | ours/torch | ours GFLOP/s |"
              + extra, file=out)
        print("|---|---|---|---|---|---|---|---|" + ("---|" if against else ""), file=out)
        ratios = []
        for (N, C, H, W), K, k, d in shapes:
            pad = d * (k - 1) // 2
            rng = np.random.default_rng(0)
            x = rng.standard_normal((N, C, H, W), dtype=np.float32)
            w = (rng.standard_normal((K, C, k, k), dtype=np.float32) * 0.01)
            b = np.zeros(K, dtype=np.float32)
            xt, wt, bt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True), \
                Tensor(b, requires_grad=True)
            if device == "cuda":
                xt, wt, bt = (Tensor(t.to("cuda").data, requires_grad=True)
                              for t in (xt, wt, bt))
            dy_shape = (N, K, H, W)
            dy = rng.standard_normal(dy_shape, dtype=np.float32)
            dy_ours = Tensor(dy).to(device).data

            def ours():
                y = F.conv2d(xt, wt, bt, 1, pad, d)
                y.backward(dy_ours)
                csync()

            X = torch.tensor(x, device=tdev, requires_grad=True)
            Wt = torch.tensor(w, device=tdev, requires_grad=True)
            B = torch.tensor(b, device=tdev, requires_grad=True)
            DY = torch.tensor(dy, device=tdev)

            def theirs():
                y = torch.nn.functional.conv2d(X, Wt, B, padding=pad, dilation=d)
                y.backward(DY)
                sync()

            def rung_below():
                atrous_conv.DEFAULT[device] = against
                try:
                    ours()
                finally:
                    atrous_conv.DEFAULT[device] = ours_name

            fns = [ours, theirs] + ([rung_below] if against else [])
            times = np.array(block_times(fns, repeat, rounds))
            t_ours, t_torch = times[:, 0].min(), times[:, 1].min()
            per_round = times[:, 0] / times[:, 1]
            flops = 3 * 2 * N * K * H * W * C * k * k
            ratios.append(float(np.median(per_round)))
            row = (f"| {(N, C, H, W)} | {K} | {k}×{k} | {d} | {t_ours * 1e3:.1f} | "
                   f"{t_torch * 1e3:.1f} | {ratios[-1]:.2f} [{per_round.min():.2f}-"
                   f"{per_round.max():.2f}] | {flops / t_ours / 1e9:.1f} |")
            if against:
                rung = times[:, 0] / times[:, 2]
                row += f" {np.median(rung):.2f} [{rung.min():.2f}-{rung.max():.2f}] |"
            print(row, file=out)
        print(f"\nmedian ratio ours/torch: {statistics.median(ratios):.2f}, "
              f"worst: {max(ratios):.2f}", file=out)
    print_steal_line(ticks, out)
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    add_timing_arguments(parser, repeat=5, rounds=4, rounds_help="blocks of ours then torch "
                         "per shape; the ratio is their median")
    parser.add_argument("--variant", default=None,
                        help="ours with this atrous_conv variant (default: the library's)")
    parser.add_argument("--against", default=None, metavar="VARIANT",
                        help="also time ours with this variant, in the same rounds")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="every shape at this batch size (default: the table's)")
    args = parser.parse_args(argv)
    shapes = SHAPES if args.batch is None else \
        [((args.batch, *x[1:]), K, k, d) for x, K, k, d in SHAPES]
    run(args.device, args.threads, args.repeat, shapes=shapes, variant=args.variant,
        rounds=args.rounds, against=args.against)


if __name__ == "__main__":
    main()
