"""Choosing the dense CRF's parameters on held-out images, as DeepLab does (v2 §4.1: w2 and θγ
fixed, w1, θα, θβ cross-validated on 100 val images).

The network runs once per image; its probabilities are cached on disk (float16), so every
candidate costs only mean-field inference.  The search is coarse to fine: a 3 × 3 × 3 grid
over (w1 = ``bi_w``, θα = ``bi_xy_std``, θβ = ``bi_rgb_std``), then a grid of half the steps
around the best, always with DeepLab's defaults among the candidates so the answer is never
worse than them on the tuning images.  Candidates are scored in parallel processes, one per
core, each running the CRF single-threaded (many small independent jobs use cores better
than one parallel job at a time).
"""
import concurrent.futures
import itertools
import os
import tempfile
import time

import numpy as np

from . import crf as crf_module
from .metrics import ConfusionMatrix

DEFAULTS = {"iterations": 10, "pos_w": 3, "pos_xy_std": 1, "bi_w": 4, "bi_xy_std": 67,
            "bi_rgb_std": 3}
COARSE = {"bi_w": (2, 4, 6), "bi_xy_std": (30, 60, 90), "bi_rgb_std": (2, 4, 6)}
SEARCHED = tuple(COARSE)


def cache_probabilities(model, dataset, indices, folder, scales=(1.0,), flip=False,
                        device="cpu", progress=False):
    """Run the network once on each image and store (image, probabilities as float16, label)
    in ``folder``; returns the file names."""
    from .evaluate import predict_probs

    paths = []
    it = indices
    if progress:
        from tqdm import tqdm

        it = tqdm(indices, desc="network", unit="img")
    for i in it:
        image, label = dataset[i]
        probs = predict_probs(model, image, scales, device, flip)
        path = os.path.join(folder, f"{i:06d}.npz")
        np.savez(path, image=image, probs=probs.astype(np.float16), label=label)
        paths.append(path)
    return paths


def _load(path):
    with np.load(path) as f:
        probs = f["probs"].astype(np.float32)
        probs /= probs.sum(0, keepdims=True)  # float16 rounding: sums back to 1
        return f["image"], probs, f["label"]


def _score(args):
    """Confusion matrices of each candidate over the cached images (one worker's share)."""
    paths, candidates, num_classes, threads = args
    if threads:
        import numba

        numba.set_num_threads(threads)
    matrices = [ConfusionMatrix(num_classes) for _ in candidates]
    for path in paths:
        image, probs, label = _load(path)
        for m, params in zip(matrices, candidates):
            q = crf_module.dense_crf(image, probs, **params)
            m.update(q.argmax(0), label)
    return [m.matrix for m in matrices]


def score_candidates(paths, candidates, num_classes, workers=2):
    """mIoU of each candidate (a dict of dense_crf arguments) on the cached images, and of
    no CRF at all (the key None)."""
    chunks = [candidates[w::workers] for w in range(workers)]
    chunks = [c for c in chunks if c]
    if len(chunks) <= 1:
        results = [_score((paths, candidates, num_classes, None))]
        order = [candidates]
    else:
        with concurrent.futures.ProcessPoolExecutor(len(chunks)) as pool:
            results = list(pool.map(_score, [(paths, c, num_classes, 1) for c in chunks]))
        order = chunks
    scores = {}
    for chunk, matrices in zip(order, results):
        for params, matrix in zip(chunk, matrices):
            m = ConfusionMatrix(num_classes)
            m.matrix = matrix
            scores[_key(params)] = m.scores()["miou"]
    return scores


def _key(params):
    return tuple(sorted(params.items()))


def _fine(best):
    """Half the coarse steps around ``best``, kept positive."""
    steps = {k: (v[1] - v[0]) / 2 for k, v in COARSE.items()}
    axes = [[best[k] + d * steps[k] for d in (-1, 0, 1) if best[k] + d * steps[k] > 0]
            for k in SEARCHED]
    return [dict(zip(SEARCHED, values)) for values in itertools.product(*axes)]


def search(model, dataset, subset=100, fixed=None, scales=(1.0,), flip=False, device="cpu",
           workers=2, holdout=0, log=print, progress=False):
    """Coarse-to-fine search of (bi_w, bi_xy_std, bi_rgb_std) on the first ``subset`` images
    of ``dataset``; ``fixed``: the other dense_crf arguments (DeepLab's by default).  With
    ``holdout`` > 0 the default and the best are also scored on the next ``holdout`` images,
    which the search never saw.  Returns a dict: the best parameters (``crf``), the table,
    the scores of no CRF, of the defaults and of the best."""
    fixed = {**{k: DEFAULTS[k] for k in ("iterations", "pos_w", "pos_xy_std")}, **(fixed or {})}
    n = min(subset, len(dataset))
    held = list(range(n, min(n + holdout, len(dataset))))
    default = {**fixed, **{k: DEFAULTS[k] for k in SEARCHED}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tinydeeplab-tune-") as folder:
        paths = cache_probabilities(model, dataset, range(n), folder, scales, flip, device,
                                    progress)
        plain = ConfusionMatrix(dataset.num_classes)
        for p in paths:
            _, probs, label = _load(p)
            plain.update(probs.argmax(0), label)
        coarse = [{**fixed, **dict(zip(SEARCHED, v))}
                  for v in itertools.product(*(COARSE[k] for k in SEARCHED))] + [default]
        log(f"{len(coarse)} coarse candidates on {n} images")
        scores = score_candidates(paths, coarse, dataset.num_classes, workers)
        best = dict(max(scores, key=scores.get))
        fine = [{**fixed, **c} for c in _fine(best) if _key({**fixed, **c}) not in scores]
        log(f"{len(fine)} fine candidates around bi_w {best['bi_w']:g}, bi_xy_std "
            f"{best['bi_xy_std']:g}, bi_rgb_std {best['bi_rgb_std']:g}")
        scores.update(score_candidates(paths, fine, dataset.num_classes, workers))
        best = dict(max(scores, key=scores.get))
        result = {
            "crf": best, "split_images": n, "no_crf_miou": plain.scores()["miou"],
            "default": {"crf": default, "miou": scores[_key(default)]},
            "best_miou": scores[_key(best)],
            "table": sorted(({**{k: dict(key)[k] for k in SEARCHED}, "miou": v}
                             for key, v in scores.items()), key=lambda r: -r["miou"]),
        }
        if held:
            paths = cache_probabilities(model, dataset, held, folder, scales, flip, device)
            again = score_candidates(paths, [default, best], dataset.num_classes, workers)
            result["holdout"] = {"images": len(held), "default_miou": again[_key(default)],
                                 "best_miou": again[_key(best)]}
    result["seconds"] = time.perf_counter() - t0
    return result
