"""The one-launch CUDA mean field under register caps, against the step-by-step inference.

    python benchmarks/sweep_mean_field.py [--image PHOTO] [--blocks 6 8 12]   # GPU only

``permutohedral.cuda_mean_field._mean_field_kernel`` is compiled with launch bounds that let B blocks of
128 threads share a multiprocessor (B = MEAN_FIELD_BLOCKS_PER_SM by default; the compiler then
keeps it to 65536 / (128 B) registers a thread), and once without any bound.  For the photograph
at three sizes (and the synthetic scene) and both parameter sets, each variant's 10 iterations
(``inference(10)`` alone, the lattices built once, synchronised) run in turns, --repeat rounds;
the table gives the medians in ms and checks that every variant's Q is within float32 rounding of the plain loop's.
"""
import argparse
import statistics
import sys
import time

import tinydeeplab  # noqa: F401  first: thread set-up before NumPy (tinydeeplab/_threads.py)
import numpy as np

from tinydeeplab.benchmarks import add_image_argument, positive_int
from tinydeeplab.benchmarks.bench_crf import PARAMS, PHOTO, make_scene

SIZES = [(375, 500), (188, 250), (750, 1000)]


def variants(blocks):
    """{name: kernel}: the mean-field kernel without launch bounds and with each cap."""
    from tinydeeplab.kernels.permutohedral import cuda_mean_field as pc

    kernels = {"no bound": pc.compile_kernel(None)}
    for b in blocks:
        kernels[f"{b} blocks"] = pc.compile_kernel(b)
    return kernels


def sweep(image, probs, p, kernels, repeat):
    """{variant: (median ms, max |Q − Q plain loop|, blocks launched)} for one scene."""
    import cupy

    from tinydeeplab import crf
    from tinydeeplab.kernels.permutohedral import cuda_mean_field as pc

    C, H, W = probs.shape
    d = crf.DenseCRF2D(W, H, C, device="cuda")
    d.setUnaryEnergy(crf.unary_from_softmax(cupy.asarray(probs)))
    d.addPairwiseGaussian(sxy=p["gs"], compat=p["gw"])
    d.addPairwiseBilateral(sxy=p["bs"], srgb=p["br"], rgbim=cupy.asarray(image), compat=p["bw"])
    lattices = [k.lattice.kernel for k in d.pairwise]
    runs, blocks = {}, {}

    def plain_loop():  # the plain loop on the CUDA lattices
        return d.inference(10, engine="plain")

    runs["plain loop"] = plain_loop
    for name, kernel in kernels.items():  # each sizes its grid for its own kernel
        fused = pc.MeanFieldCUDA.make(lattices, [k.pre for k in d.pairwise],
                                      [k.post_w for k in d.pairwise], C, kernel=kernel)
        blocks[name] = fused.blocks
        runs[name] = lambda fused=fused: fused.run(d.unary, 10)
    sync = cupy.cuda.get_current_stream().synchronize
    q = {name: cupy.asnumpy(run()) for name, run in runs.items()}  # (and warm-up)
    times = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: (1e3 * statistics.median(times[name]),
                   float(np.abs(q[name] - q["plain loop"]).max()), blocks.get(name, ""))
            for name in runs}, [k.lattice.num_vertices for k in d.pairwise]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_image_argument(parser)
    parser.add_argument("--blocks", type=positive_int, nargs="+", default=[6, 8, 12])
    parser.add_argument("--repeat", type=positive_int, default=9)
    args = parser.parse_args(argv)
    from tinydeeplab.backend import has_cuda

    if not has_cuda():
        sys.exit("sweep_mean_field.py needs a CUDA GPU (CuPy and numba-cuda)")
    from tinydeeplab.benchmarks.bench_conv import quiet_small_grid_warnings

    quiet_small_grid_warnings()
    kernels = variants(args.blocks)
    scenes = [(size, args.image or PHOTO) for size in SIZES] + [(SIZES[0], None)]
    for (H, W), photo in scenes:
        image, probs, scene = make_scene(H, W, photo=photo)
        for name, p in PARAMS.items():
            results, sizes = sweep(image, probs, p, kernels, args.repeat)
            print(f"\n## {W}×{H} {scene}, {name}: vertices {sizes}")
            print("| inference(10) | ms | max abs ΔQ | blocks |\n|---|---|---|---|")
            for variant, (ms, dq, blocks) in results.items():
                print(f"| {variant} | {ms:.2f} | {dq:.1e} | {blocks} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
