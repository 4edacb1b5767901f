"""The dense CRF of this checkout against another checkout of tinydeeplab, in turns.

Speed work is judged against the code before it: this runs ``bench_crf.run_ours`` (one whole
CRF run as ``bench_crf.py`` times it: unary, both lattices, 10 iterations) from two source
trees alternately (the first of each round alternating too), each in a warm worker process
of its own, and prints the medians and the
per-round ratios (the other tree's time over this one's: above 1 means this checkout is
faster), with the largest difference between their Q.

    git worktree add /tmp/before HEAD~3      # the code to compare with
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        python benchmarks/crf_against_revision.py /tmp/before --repeat 9 --image PHOTO
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

import numpy as np

WORKER = r"""
import json, sys, time
import numpy as np
from tinydeeplab.benchmarks.bench_crf import PARAMS, make_scene, run_ours
H, W, photo = json.loads(sys.argv[1])
image, probs, scene = make_scene(H, W, photo=photo)
print(json.dumps(scene), flush=True)
for line in sys.stdin:
    p = PARAMS[json.loads(line)]
    t0 = time.perf_counter()
    Q, _ = run_ours(image, probs, p)
    t = time.perf_counter() - t0
    np.save(sys.argv[2], np.asarray(Q))
    print(json.dumps(t), flush=True)
"""

HERE = pathlib.Path(__file__).resolve().parents[1]


def start(tree, args, q_path):
    env = dict(os.environ, PYTHONPATH=str(tree))
    worker = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(args), str(q_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env, cwd=str(tree))
    scene = json.loads(worker.stdout.readline())
    return worker, scene


def ask(worker, name):
    worker.stdin.write(json.dumps(name) + "\n")
    worker.stdin.flush()
    return json.loads(worker.stdout.readline())


def main(argv=None):
    from tinydeeplab.benchmarks import add_image_argument, positive_int
    from tinydeeplab.benchmarks.bench_crf import PARAMS, PHOTO

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("other", help="the other checkout's root (its tinydeeplab/ and kernels/)")
    ap.add_argument("--repeat", type=positive_int, default=7, help="rounds in turns")
    ap.add_argument("--size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    add_image_argument(ap)
    args = ap.parse_args(argv)
    other = pathlib.Path(args.other).resolve()
    if not (other / "tinydeeplab" / "crf.py").is_file():
        ap.error(f"{other} is not a tinydeeplab checkout (no tinydeeplab/crf.py)")
    photo = args.image or PHOTO
    q_this, q_other = pathlib.Path("/tmp/tdl_q_this.npy"), pathlib.Path("/tmp/tdl_q_other.npy")
    this, scene = start(HERE, (*args.size, photo), q_this)
    that, _ = start(other, (*args.size, photo), q_other)
    print(f"# dense CRF, this checkout against {other}, in turns: {scene}, 10 iterations, "
          f"{args.repeat} rounds")
    print("| parameters | this (s) | other (s) | other / this, median [range] | max |ΔQ| |")
    print("|---|---|---|---|---|")
    for name in PARAMS:
        ask(this, name), ask(that, name)  # warm-up: compiles, first-touch of buffers
        times = [[], []]
        for r in range(args.repeat):  # who goes first alternates (ABBA): no order bias
            if r % 2:
                times[1].append(ask(that, name))
                times[0].append(ask(this, name))
            else:
                times[0].append(ask(this, name))
                times[1].append(ask(that, name))
        dq = float(np.abs(np.load(q_this) - np.load(q_other)).max())
        ratios = [b / a for a, b in zip(*times)]
        print(f"| {name} | {statistics.median(times[0]):.3f} | {statistics.median(times[1]):.3f} "
              f"| {statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] "
              f"| {dq:.1e} |")
    for worker in (this, that):
        worker.stdin.close()
        worker.wait()


if __name__ == "__main__":
    main()
