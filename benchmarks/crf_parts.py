"""Parts of the CPU CRF, each against the way it was done before, in turns, in one process.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/crf_parts.py

On the scene of ``bench_crf.py`` (the photograph where it is found), with DeepLab's parameters:

1. The spatial kernel's filter of 21 channels in one sweep (``LatticeCPU.stream``) against
   splat, blur and slice through the vertex buffer — forward, and the transposed filter.
2. The softmax of (N, 21) float32 rows, each row in registers (``_row_softmax``) against
   maximum / exp-and-sum / scaling in three passes over the row — one thread, in cache.
3. The radix sort of the lattices' vertex keys in parallel over blocks against one block.

Whole CRF runs with and without (1) are in ``profile_crf.py``; RESULTS.md has the figures.
"""
import argparse
import statistics
import sys

import tinydeeplab  # noqa: F401  first: thread set-up before NumPy (tinydeeplab/_threads.py)
import numba
import numpy as np

from tinydeeplab.benchmarks import add_image_argument, positive_int
from tinydeeplab.benchmarks.bench_crf import PARAMS, PHOTO, in_turns, make_scene


def line(what, names, times):
    """'what: a x.xx ms, b y.yy ms: b/a z.zz× [range]' from per-round seconds."""
    ratios = [b / a for a, b in zip(*times)]
    return (f"{what}: {names[0]} {1e3 * statistics.median(times[0]):.2f} ms, {names[1]} "
            f"{1e3 * statistics.median(times[1]):.2f} ms: {statistics.median(ratios):.2f}× "
            f"[{min(ratios):.2f}-{max(ratios):.2f}]")


def stream_against_steps(lattice, values, factor, repeat, reverse):
    base = np.ones_like(values)

    def run(schedule):
        def one():  # onto a base, as the CRF's message onto the unary
            return lattice.filter(values, reverse, factor, factor, np.empty_like(values), base,
                                  schedule=schedule)
        return one

    times, (a, b) = in_turns([run("stream"), run("steps")], repeat)
    return times, np.abs(a - b).max()


def softmax_in_registers_against_three_passes(N, C, repeat):
    from tinydeeplab.kernels import softmax as S

    ops = S.ROW_OPERATIONS
    one, row_max, exp_sum, times_ = ops["softmax"], ops["max"], ops["exp_sum"], ops["times"]

    @numba.njit(fastmath=True)
    def registers(a, out):
        for n in range(a.shape[0]):
            one(out, n, a)

    @numba.njit(fastmath=True)
    def three_passes(a, out):
        for n in range(a.shape[0]):
            times_(out, n, np.float32(1.0) / exp_sum(out, n, a, row_max(a, n)))

    a = (np.random.default_rng(0).standard_normal((N, C)) * 3).astype(np.float32)
    outs = [np.empty_like(a), np.empty_like(a)]
    fns = [lambda f=f, o=o: f(a, o) for f, o in zip((registers, three_passes), outs)]
    times, _ = in_turns(fns, repeat)
    return times, np.abs(outs[0] - outs[1]).max()


def radix_in_blocks_against_one(words, repeat):
    from tinydeeplab.kernels.permutohedral.cpu_fast_build import radix_argsort

    T = numba.get_num_threads()
    times, (a, b) = in_turns([lambda: radix_argsort(words, T),
                              lambda: radix_argsort(words, 1)], repeat)
    assert np.array_equal(a, b)
    return times, T


def run(repeat=9, size=(375, 500), out=sys.stdout, photo=PHOTO):
    from tinydeeplab import crf
    from tinydeeplab.kernels.permutohedral.cpu_fast import LatticeCPU

    image, probs, scene = make_scene(*size, photo=photo)
    C, H, W = probs.shape
    p = next(iter(PARAMS.values()))
    print(f"# CPU CRF parts: {W}×{H} {scene}, {C} labels, {numba.get_num_threads()} Numba "
          f"threads, median of {repeat} rounds in turns", file=out)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    spatial = np.stack([x.ravel(), y.ravel()], 1) / np.float32(p["gs"])
    lattice = LatticeCPU(spatial)
    rng = np.random.default_rng(1)
    values = rng.random((H * W, C), dtype=np.float32)
    factor = rng.random(H * W, dtype=np.float32)
    for reverse in (False, True):
        times, dq = stream_against_steps(lattice, values, factor, repeat, reverse)
        print(line(f"spatial filter{' (transposed)' if reverse else ''}",
                   ["one sweep", "splat/blur/slice"], times) + f"; max |Δ| {dq:.1e}", file=out)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        times, dq = softmax_in_registers_against_three_passes(min(2000, H * W), C, repeat)
    finally:
        numba.set_num_threads(threads)
    print(line(f"softmax of {min(2000, H * W)}×{C} rows (one thread, in cache)",
               ["in registers", "three passes"], times) + f"; max |Δ| {dq:.1e}", file=out)
    d = crf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(crf.unary_from_softmax(probs))
    d.addPairwiseBilateral(sxy=p["bs"], srgb=p["br"], rgbim=image, compat=p["bw"])
    for name, lat in (("spatial", lattice), ("bilateral", d.pairwise[0].lattice.kernel)):
        times, T = radix_in_blocks_against_one(lat.vertex_words, repeat)
        print(line(f"radix sort of the {name} lattice's {lat.M} keys",
                   [f"{T} blocks", "1 block"], times), file=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=positive_int, default=9, help="rounds in turns")
    add_image_argument(ap)
    args = ap.parse_args(argv)
    run(args.repeat, photo=args.image or PHOTO)


if __name__ == "__main__":
    main()
