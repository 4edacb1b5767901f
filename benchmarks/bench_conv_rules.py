"""The measurements behind four of the CPU convolution's choices, on this machine.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_conv_rules.py [--rounds R]

1. Where Winograd pays (``atrous_conv.WINOGRAD_CL_MIN_FLOPS``).  Per stride-1 3×3 layer,
   forward + backward in turns (``bench_conv.block_times``): ``cpu_v6`` with the FLOP floor
   and the channel floor lifted (its tile and overhang rules kept), so that the layer takes
   Winograd, against ``cpu_v3`` (im2col / flipped-kernel GEMMs).  Where the ratio drops below
   1 depends on how fast the machine's GEMMs are next to its memory; the table says, for
   each layer, whether the library's rule takes Winograd there.
2. im2col as shifted plane copies (``atrous_conv_cpu.im2col_dilated``, used wherever the
   output is as wide as the input's phase planes) against the row-by-row copy
   (``im2col_rows``, the general one) on strided layers: the same columns, the time of each.
3. Where the direct rung pays (``atrous_conv_direct.pays``: C·kh·kw ≤ MAX_TAPS, not 1×1).
   Per layer, the forward by the direct rung (forced) against ``cpu_v6``'s, in turns, and
   whether the two agree bit for bit (they add the same products in the same order where
   OpenBLAS's kernel sums a shared dimension of that length in one sequential pass).
4. The Winograd rungs' batches of GEMMs shared out between threads, BLAS on one thread in
   each (``kernels/_gemm_batch``), against ``np.matmul`` letting OpenBLAS split every GEMM
   between its threads (``_gemm_batch.SPLIT = False``): forward + backward of the library's
   default on bench_conv's 3×3 layers and the tiny model's Winograd layer, in turns.

Times: the median over rounds; ratios: the median of the per-round ratios [range].  Both sides
of every comparison are ours, on the same thread pools, so the blocks follow each other
without the pause that ``bench_conv`` leaves for another library's threads to go idle: after
a pause the CPU has clocked down, and a short layer is timed in a cold state that back-to-back
training steps never see (on machine C such pauses made these layers 2-3× slower).
"""
import argparse
import contextlib
import sys

import tinydeeplab  # noqa: F401  first: thread set-up before NumPy (tinydeeplab/_threads.py)
import numpy as np

from tinydeeplab.benchmarks import add_timing_arguments, cpu_ticks, print_steal_line
from tinydeeplab.benchmarks.bench_conv import SHAPES as CONV_SHAPES
from tinydeeplab.benchmarks.bench_conv import block_times

# (N, C, H, W), K, dilation: the tiny model's layers at 4 × 161², ResNet-50's at 1 × 321²
WINOGRAD_SHAPES = [
    ((4, 64, 21, 21), 64, 1),
    ((4, 64, 21, 21), 128, 2),
    ((1, 64, 65, 65), 64, 1),
    ((1, 64, 81, 81), 64, 1),
    ((1, 128, 41, 41), 128, 1),
    ((4, 128, 21, 21), 128, 2),
    ((2, 128, 33, 33), 128, 2),
]
# (N, C, H, W), K, kernel, stride, padding: the stems at 161² and 321², a stride-2 3×3
IM2COL_SHAPES = [
    ((4, 3, 161, 161), 16, 7, 2, 3),
    ((1, 3, 321, 321), 64, 7, 2, 3),
    ((4, 16, 41, 41), 32, 3, 2, 1),
]

# (N, C, H, W), K, kernel, stride, dilation (padding keeps the size): the tiny model's layers
# with few input channels, ResNet's stem, then layers past the rule (64 channels: 576 taps;
# 1×1 kernels)
DIRECT_SHAPES = [
    ((4, 3, 161, 161), 16, 7, 2, 1),
    ((4, 16, 41, 41), 16, 3, 1, 1),
    ((4, 16, 41, 41), 32, 3, 2, 1),
    ((4, 32, 21, 21), 32, 3, 1, 1),
    ((4, 32, 21, 21), 64, 3, 1, 1),
    ((1, 3, 321, 321), 64, 7, 2, 1),
    ((4, 64, 21, 21), 64, 3, 1, 1),
    ((4, 64, 21, 21), 128, 3, 1, 2),
    ((4, 32, 21, 21), 64, 1, 1, 1),
    ((1, 64, 81, 81), 256, 1, 1, 1),
]

# (N, C, H, W), K, dilation: bench_conv's 3×3 backbone layers (not its 21-class ASPP ones,
# below Winograd's channel floor), then the tiny model's Winograd layer
SPLIT_SHAPES = [(x, K, d) for x, K, k, d in CONV_SHAPES if k == 3 and K >= 64] + [
    ((4, 128, 21, 21), 128, 2)]


@contextlib.contextmanager
def _floors_lifted():
    """cpu_v6 without its FLOP and channel floors: every layer of Winograd's shape takes it."""
    from tinydeeplab.kernels import atrous_conv as ac

    floors = ac.WINOGRAD_MIN_CHANNELS, ac.WINOGRAD_CL_MIN_FLOPS
    ac.WINOGRAD_MIN_CHANNELS, ac.WINOGRAD_CL_MIN_FLOPS = 1, 0
    try:
        yield
    finally:
        ac.WINOGRAD_MIN_CHANNELS, ac.WINOGRAD_CL_MIN_FLOPS = floors


def _layer(shape, K, seed):
    """x, a 3×3 kernel w and dy (same-size output) for a stride-1 layer, float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    w = rng.standard_normal((K, shape[1], 3, 3), dtype=np.float32) * 0.03
    dy = rng.standard_normal((shape[0], K, *shape[2:]), dtype=np.float32)
    return x, w, dy


def _winograd_functions(shape, K, d, seed=0):
    """(forced, plain, whether the rule takes Winograd, whether forcing can: tiles, overhang)"""
    from tinydeeplab.kernels import atrous_conv as ac

    x, w, dy = _layer(shape, K, seed)

    def step(variant):
        ac.conv2d_forward(x, w, None, 1, d, d, variant=variant)
        ac.conv2d_backward(x, w, dy, 1, d, d, variant=variant)

    def forced():
        with _floors_lifted():
            step("cpu_v6")

    def pays():
        return ac.winograd_pays(shape, w.shape, (1, 1), (d, d), (d, d), 4, "winograd_cl4")

    rule = pays()
    with _floors_lifted():
        possible = pays()
    return forced, lambda: step("cpu_v3"), rule, possible


def _im2col_functions(shape, K, k, s, pad, seed=0):
    from tinydeeplab.kernels import atrous_conv as ac
    from tinydeeplab.kernels import atrous_conv_cpu as cpu

    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    Ho, Wo = ac.output_size(shape[2], shape[3], k, k, (s, s), (pad, pad), (1, 1))
    args = ((K, shape[1], k, k), (s, s), (pad, pad), (1, 1), 0, Ho, Wo)
    shifted = np.empty((shape[1] * k * k, shape[0] * Ho * Wo), np.float32)
    rowwise = np.empty_like(shifted)
    cpu.im2col_dilated(x, *args, shifted)
    cpu.im2col_rows(x, *args, rowwise)
    same = bool(np.array_equal(shifted, rowwise))
    return (lambda: cpu.im2col_dilated(x, *args, shifted),
            lambda: cpu.im2col_rows(x, *args, rowwise), same)


def _direct_functions(shape, K, k, s, d, seed=0):
    """(the direct rung forced, cpu_v6's forward, whether the rule takes it, same bits)"""
    from tinydeeplab.kernels import atrous_conv as ac
    from tinydeeplab.kernels import atrous_conv_direct as direct

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    w = rng.standard_normal((K, shape[1], k, k), dtype=np.float32) * 0.1
    pad = d * (k - 1) // 2
    pairs = (s, s), (pad, pad), (d, d)
    Wo = ac.output_size(shape[2], shape[3], k, k, *pairs)[1]
    same = bool(np.array_equal(direct.forward(x, w, None, *pairs),
                               ac.conv2d_forward(x, w, None, *pairs, variant="cpu_v6")))
    return (lambda: direct.forward(x, w, None, *pairs),
            lambda: ac.conv2d_forward(x, w, None, *pairs, variant="cpu_v6"),
            direct.pays(w.shape, x.dtype, Wo), same)


def _split_functions(shape, K, d, seed=0):
    """(forward + backward with the GEMM batches split, the same with them whole, whether the
    library takes Winograd there)"""
    from tinydeeplab.kernels import _gemm_batch
    from tinydeeplab.kernels import atrous_conv as ac

    x, w, dy = _layer(shape, K, seed)

    def step(split):
        before, _gemm_batch.SPLIT = _gemm_batch.SPLIT, split
        try:
            ac.conv2d_forward(x, w, None, 1, d, d)
            ac.conv2d_backward(x, w, dy, 1, d, d)
        finally:
            _gemm_batch.SPLIT = before

    takes = ac.winograd_pays(shape, w.shape, (1, 1), (d, d), (d, d), 4, "winograd_cl4")
    return lambda: step(True), lambda: step(False), takes


def _in_turns(first, second, repeat, rounds):
    """Median times (ms) of the two, timed in turns back to back, and the per-round ratios
    first / second."""
    t = np.array(block_times([first, second], repeat, rounds, pause=0))
    return np.median(t, axis=0) * 1e3, t[:, 0] / t[:, 1]


def _ratio_text(r):
    return f"{np.median(r):.2f} [{r.min():.2f}-{r.max():.2f}]"


def run(threads=None, repeat=5, rounds=7, winograd_shapes=WINOGRAD_SHAPES,
        im2col_shapes=IM2COL_SHAPES, direct_shapes=DIRECT_SHAPES, split_shapes=SPLIT_SHAPES,
        out=sys.stdout):
    import os

    import numba
    from threadpoolctl import threadpool_limits

    from tinydeeplab.benchmarks.bench_conv import blas_info, gemm_gflops
    from tinydeeplab.kernels import atrous_conv as ac
    from tinydeeplab.kernels import atrous_conv_direct as direct

    threads = threads or os.cpu_count()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    ticks = cpu_ticks()
    results = {"winograd": [], "im2col": [], "direct": [], "split": []}
    with threadpool_limits(limits=threads, user_api="blas"):
        print(f"# CPU convolution rules, float32, {threads} threads; BLAS: {blas_info()}",
              file=out)
        print(f"# NumPy sgemm 1024³ roofline: {gemm_gflops(threads):.1f} GFLOP/s (the host's "
              "speed at the start)", file=out)
        print(f"# {rounds} rounds in turns; times: median of the rounds; ratios: median of the "
              "per-round ratios [range]", file=out)
        print(f"\nWinograd forced (cpu_v6) against cpu_v3, forward + backward; the rule takes "
              f"Winograd from {ac.WINOGRAD_CL_MIN_FLOPS / 1e9:.2f} GFLOP", file=out)
        print("| input (N,C,H,W) | K | d | GFLOP | rule takes it | Winograd ms | cpu_v3 ms | "
              "Winograd / cpu_v3 |", file=out)
        print("|---|---|---|---|---|---|---|---|", file=out)
        for shape, K, d in winograd_shapes:
            forced, plain, rule, possible = _winograd_functions(shape, K, d)
            gflop = 2 * K * shape[1] * 9 * shape[0] * shape[2] * shape[3] / 1e9
            if not possible:  # too few tiles or too much overhang: forcing changes nothing
                print(f"| {shape} | {K} | {d} | {gflop:.2f} | no | - | - | not Winograd's "
                      "shape (tiles, overhang) |", file=out)
                continue
            med, r = _in_turns(forced, plain, repeat, rounds)
            print(f"| {shape} | {K} | {d} | {gflop:.2f} | {'yes' if rule else 'no'} | "
                  f"{med[0]:.2f} | {med[1]:.2f} | {_ratio_text(r)} |", file=out)
            results["winograd"].append((gflop, rule, float(np.median(r))))
        print("\nim2col: shifted plane copies against row by row (the same columns)", file=out)
        print("| input (N,C,H,W) | kernel | stride | same columns | shifted ms | row by row ms "
              "| shifted / row by row |", file=out)
        print("|---|---|---|---|---|---|---|", file=out)
        for shape, K, k, s, pad in im2col_shapes:
            shifted, rowwise, same = _im2col_functions(shape, K, k, s, pad)
            med, r = _in_turns(shifted, rowwise, repeat, rounds)
            print(f"| {shape} | {k}×{k} | {s} | {'yes' if same else 'NO'} | {med[0]:.3f} | "
                  f"{med[1]:.3f} | {_ratio_text(r)} |", file=out)
            results["im2col"].append((same, float(np.median(r))))
        print("\nThe direct rung (forced) against cpu_v6, forward; the rule takes it up to "
              f"{direct.MAX_TAPS} taps (C·kh·kw), not for 1×1 kernels", file=out)
        print("| input (N,C,H,W) | K | kernel | stride | d | taps | rule takes it | same bits "
              "as cpu_v6 | direct ms | cpu_v6 ms | direct / cpu_v6 |", file=out)
        print("|---|---|---|---|---|---|---|---|---|---|---|", file=out)
        for shape, K, k, s, d in direct_shapes:
            forced, v6, rule, same = _direct_functions(shape, K, k, s, d)
            med, r = _in_turns(forced, v6, repeat, rounds)
            print(f"| {shape} | {K} | {k}×{k} | {s} | {d} | {shape[1] * k * k} | "
                  f"{'yes' if rule else 'no'} | {'yes' if same else 'no'} | {med[0]:.3f} | "
                  f"{med[1]:.3f} | {_ratio_text(r)} |", file=out)
            results["direct"].append((rule, same, float(np.median(r))))
        print("\nThe Winograd GEMM batches split between threads (BLAS on one thread in each) "
              "against OpenBLAS splitting each GEMM, forward + backward of the default "
              f"({ac.DEFAULT['cpu']})", file=out)
        print("| input (N,C,H,W) | K | d | Winograd | split ms | whole ms | split / whole |",
              file=out)
        print("|---|---|---|---|---|---|---|", file=out)
        for shape, K, d in split_shapes:
            split, whole, takes = _split_functions(shape, K, d)
            med, r = _in_turns(split, whole, repeat, rounds)
            print(f"| {shape} | {K} | {d} | {'yes' if takes else 'no'} | {med[0]:.2f} | "
                  f"{med[1]:.2f} | {_ratio_text(r)} |", file=out)
            results["split"].append((takes, float(np.median(r))))
    print_steal_line(ticks, out)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser, repeat=5, rounds=7)
    args = parser.parse_args(argv)
    run(args.threads, args.repeat, args.rounds)


if __name__ == "__main__":
    main()
