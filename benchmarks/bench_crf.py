"""Dense CRF: tinydeeplab against pydensecrf on a 500×375 photograph-like image, 21 labels.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_crf.py [--image PHOTO]

Total time of 10 mean-field iterations, lattice construction included, with DeepLab v2's
parameters and with pydensecrf's README parameters.  After one warm-up run each (it loads the
compiled Numba kernels), pydensecrf and ours run in turns, --repeat rounds: the speed-up is
the median of the rounds' ratios, with their range — on a shared machine whose speed drifts,
ratios of runs made seconds apart are steadier than ratios of separate medians.  Also: lattice
sizes (vertices per kernel), peak memory of our run (tracemalloc: NumPy allocations;
pydensecrf's C++ heap is not seen; with --device cuda also the GPU memory from CuPy's pool),
agreement of the two results.  The image is the photograph ``--image`` (by default
``../shared/data/crf_examples/im1.png`` beside the checkout) resized to 500×375, or, where there
is none, a synthetic textured scene — noisier, so its bilateral lattice is several times larger
and both sides slower: the header says which was used, and only runs on the same scene compare.
"""
import argparse
import os
import statistics
import sys
import time
import tracemalloc

import tinydeeplab  # noqa: F401  first: thread set-up before NumPy (tinydeeplab/_threads.py)
import numpy as np

from tinydeeplab.benchmarks import add_image_argument, cpu_ticks, positive_int, print_steal_line

PARAMS = {
    "DeepLab v2 (pos 1/3, bi 67/3/4)": dict(gs=1, gw=3, bs=67, br=3, bw=4),
    "pydensecrf README (pos 3/3, bi 80/13/10)": dict(gs=3, gw=3, bs=80, br=13, bw=10),
}


PHOTO = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "crf_examples",
                     "im1.png")


def make_scene(H=375, W=500, C=21, seed=0, photo=PHOTO):
    """(image, probs, what the image is): the photograph ``photo`` resized to W×H where that
    file exists (``photo=None``: never), else a textured synthetic scene; and a noisy softmax
    that prefers a blocky 'segmentation' of it."""
    rng = np.random.default_rng(seed)
    if photo is not None and os.path.exists(photo):
        from PIL import Image

        image = np.array(Image.open(photo).convert("RGB").resize((W, H)))
        scene = f"photograph {os.path.basename(photo)}"
    else:
        yy, xx = np.mgrid[0:H, 0:W]
        image = np.stack([(xx * 255 // W), (yy * 255 // H), ((xx + yy) % 64) * 4], -1)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        scene = "synthetic textured scene" + ("" if photo is None else
                                              f" ({os.path.normpath(photo)} not found)")
    labels = (np.arange(H)[:, None] // 60 * 7 + np.arange(W)[None, :] // 90) % C
    logits = rng.normal(0, 1.0, (C, H, W)).astype(np.float32)
    logits[labels, np.arange(H)[:, None], np.arange(W)[None, :]] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(0)
    return image, probs.astype(np.float32), scene


def run_ours(image, probs, p, device="cpu", step=None, engine=None):
    """One CRF run as the benchmark times it; ``step(name)``, if given, is called after each
    step (profile_crf.py times the steps with it); ``engine`` as DenseCRF.inference takes it
    (None: the default; "plain": the plain loop)."""
    from tinydeeplab import crf

    step = step or (lambda name: None)
    C, H, W = probs.shape
    if device == "cuda":  # (NumPy arrays stay NumPy under the CUDA simulator)
        image, probs = crf.on_device(image, "cuda"), crf.on_device(probs, "cuda")
        step("inputs to the device")
    d = crf.DenseCRF2D(W, H, C, device=device)
    d.setUnaryEnergy(crf.unary_from_softmax(probs))
    step("unary")
    d.addPairwiseGaussian(sxy=p["gs"], compat=p["gw"])
    step("spatial lattice + normalisation")
    d.addPairwiseBilateral(sxy=p["bs"], srgb=p["br"], rgbim=image, compat=p["bw"])
    step("bilateral lattice + normalisation")
    if device == "cuda":  # (inference would make it first thing; made here, it is timed apart)
        d.mean_field_engine(engine)
        step("one-launch mean field: set-up")
    Q = d.inference(10, engine)
    step("10 iterations")
    if device == "cuda":
        Q = crf.to_device(Q, "cpu")
        step("Q to the host")
    return Q, [k.lattice.num_vertices for k in d.pairwise]


def run_pydensecrf(image, probs, p):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    C, H, W = probs.shape
    d = dcrf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=p["gs"], compat=p["gw"])
    d.addPairwiseBilateral(sxy=p["bs"], srgb=p["br"], rgbim=np.ascontiguousarray(image),
                           compat=p["bw"])
    return np.array(d.inference(10)), None


def in_turns(fns, repeat):
    """Run each function once to warm up, then all of them in turns, ``repeat`` rounds:
    (their seconds per round, their last outputs)."""
    outs = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return times, outs


def peak_memory(fn, device="cpu"):
    """Peak host memory of one call (tracemalloc: NumPy's allocations) and, on a GPU, the
    device memory it took: CuPy's pool holds on to every block a call frees, so after
    emptying it the pool's size at the end is the call's peak."""
    gpu = None
    if device == "cuda":
        import cupy

        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if device == "cuda":
        gpu = pool.total_bytes()
    return peak, gpu


def run(device="cpu", repeat=5, out=sys.stdout, photo=PHOTO):
    import numba

    from tinydeeplab.benchmarks.bench_conv import blas_info, quiet_small_grid_warnings

    if device == "cuda":
        quiet_small_grid_warnings()
    image, probs, scene = make_scene(photo=photo)
    C, H, W = probs.shape
    ticks = cpu_ticks()
    print(f"# dense CRF, {W}×{H} {scene}, {C} labels, 10 iterations, device={device}, "
          f"{numba.get_num_threads()} Numba threads (pydensecrf: 1 thread, CPU); "
          f"{repeat} rounds in turns", file=out)
    print(f"# BLAS (not used by either CRF): {blas_info()}", file=out)  # and a threads line
    print("| parameters | pydensecrf s | ours s | speed-up [range] | lattice vertices (pos, bi) "
          "| peak MB ours | max abs ΔQ | MAP agreement |", file=out)
    print("|---|---|---|---|---|---|---|---|", file=out)
    for name, p in PARAMS.items():
        (t_ref, t_ours), ((q_ref, _), (q, sizes)) = in_turns(
            [lambda: run_pydensecrf(image, probs, p), lambda: run_ours(image, probs, p, device)],
            repeat)
        ratios = [a / b for a, b in zip(t_ref, t_ours)]
        peak, gpu = peak_memory(lambda: run_ours(image, probs, p, device), device)
        memory = f"{peak / 2**20:.0f}" + ("" if gpu is None else f" + {gpu / 2**20:.0f} GPU")
        agree = (q.argmax(0) == q_ref.argmax(0)).mean()
        print(f"| {name} | {statistics.median(t_ref):.3f} | {statistics.median(t_ours):.3f} | "
              f"{statistics.median(ratios):.1f}× [{min(ratios):.1f}-{max(ratios):.1f}] | "
              f"{sizes} | {memory} | {np.abs(q - q_ref).max():.1e} | {agree:.5f} |",
              file=out)
    print_steal_line(ticks, out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeat", type=positive_int, default=5)
    add_image_argument(parser)
    args = parser.parse_args(argv)
    run(args.device, args.repeat, photo=args.image or PHOTO)


if __name__ == "__main__":
    main()
