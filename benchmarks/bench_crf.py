"""Dense CRF: tinydeeplab against pydensecrf on a 500×375 photograph-like image, 21 labels.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_crf.py

Total time of 10 mean-field iterations, lattice construction included (median of --repeat runs
after one warm-up run that loads the compiled Numba kernels), with DeepLab v2's parameters and
with pydensecrf's README parameters; lattice sizes (vertices per kernel), peak memory of the
run (tracemalloc: NumPy allocations, so pydensecrf's C++ heap is not seen and is reported as
the size of its output only), agreement of the two results.
"""
import argparse
import os
import statistics
import sys
import time
import tracemalloc

import tinydeeplab  # noqa: F401  first: thread set-up before NumPy (tinydeeplab/_threads.py)
import numpy as np

PARAMS = {
    "DeepLab v2 (pos 1/3, bi 67/3/4)": dict(gs=1, gw=3, bs=67, br=3, bw=4),
    "pydensecrf README (pos 3/3, bi 80/13/10)": dict(gs=3, gw=3, bs=80, br=13, bw=10),
}


def make_scene(H=375, W=500, C=21, seed=0):
    """A photograph when the shared example is there (resized), else a textured scene; and a
    noisy softmax that prefers a blocky 'segmentation' of it."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                        "crf_examples", "im1.png")
    rng = np.random.default_rng(seed)
    if os.path.exists(path):
        from PIL import Image

        image = np.array(Image.open(path).convert("RGB").resize((W, H)))
    else:
        yy, xx = np.mgrid[0:H, 0:W]
        image = np.stack([(xx * 255 // W), (yy * 255 // H), ((xx + yy) % 64) * 4], -1)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    labels = (np.arange(H)[:, None] // 60 * 7 + np.arange(W)[None, :] // 90) % C
    logits = rng.normal(0, 1.0, (C, H, W)).astype(np.float32)
    logits[labels, np.arange(H)[:, None], np.arange(W)[None, :]] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(0)
    return image, probs.astype(np.float32)


def run_ours(image, probs, p, device="cpu"):
    from tinydeeplab import crf

    C, H, W = probs.shape
    if device == "cuda":
        import cupy

        image, probs = cupy.asarray(image), cupy.asarray(probs)
    d = crf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(crf.unary_from_softmax(probs))
    d.addPairwiseGaussian(sxy=p["gs"], compat=p["gw"])
    d.addPairwiseBilateral(sxy=p["bs"], srgb=p["br"], rgbim=image, compat=p["bw"])
    Q = d.inference(10)
    if device == "cuda":
        Q = Q.get()
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


def timed(fn, repeat):
    fn()  # warm-up: loads the cached Numba kernels
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return statistics.median(times), out, peak


def run(device="cpu", repeat=3, out=sys.stdout):
    import numba

    image, probs = make_scene()
    C, H, W = probs.shape
    print(f"# dense CRF, {W}×{H} image, {C} labels, 10 iterations, device={device}, "
          f"{numba.get_num_threads()} Numba threads (pydensecrf: 1 thread, CPU)", file=out)
    from tinydeeplab import _threads

    print(f"# threads: {_threads.describe()}", file=out)
    print("| parameters | pydensecrf s | ours s | speed-up | lattice vertices (pos, bi) | "
          "peak MB ours | max abs ΔQ | MAP agreement |", file=out)
    print("|---|---|---|---|---|---|---|---|", file=out)
    for name, p in PARAMS.items():
        t_ref, (q_ref, _), _ = timed(lambda: run_pydensecrf(image, probs, p), repeat)
        t_ours, (q, sizes), peak = timed(lambda: run_ours(image, probs, p, device), repeat)
        agree = (q.argmax(0) == q_ref.argmax(0)).mean()
        print(f"| {name} | {t_ref:.3f} | {t_ours:.3f} | {t_ref / t_ours:.1f}× | {sizes} | "
              f"{peak / 2**20:.0f} | {np.abs(q - q_ref).max():.1e} | {agree:.5f} |", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    run(args.device, args.repeat)


if __name__ == "__main__":
    main()
