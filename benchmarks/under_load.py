"""Training while the machine is busy: the demo's training (tiny network, batch 4, crops of
113²) for a fixed number of iterations, alone and beside 1 and 2 CPU-bound processes
(``python -c "while True: pass"``), in turns.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/under_load.py

Each measurement is a fresh training process (the data set is generated once); the
competitors start before it and are killed after it.  Reported: seconds of training (the
log's per-iteration times summed, so start-up and compilation are left out) and the ratio to
training alone in the same round; ``--fixed-threads`` turns off the adaptation to load
(``TDL_ADAPT_THREADS=0``) to show what it buys.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

TRAIN = r"""
import json, sys
import tinydeeplab
from tinydeeplab.train import TrainConfig, train
cfg = TrainConfig(sys.argv[1], sys.argv[2], crop=113, scale=(0.75, 1.25), batch_size=4,
                  iterations=int(sys.argv[3]), lr=0.02, checkpoint_every=10**6, seed=0)
_, history = train(cfg, log=lambda s: None, progress=False)
print(json.dumps(sum(4 / h["images_per_s"] for h in history[5:])))
"""


def train_seconds(root, iterations, competitors, env):
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(competitors)]
    try:
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run([sys.executable, "-c", TRAIN, root, os.path.join(out, "r"),
                                   str(iterations)], capture_output=True, text=True, env=env,
                                  check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def main():
    from tinydeeplab import _threads, data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--fixed-threads", action="store_true",
                   help="no adaptation to load (TDL_ADAPT_THREADS=0)")
    args = p.parse_args()
    env = dict(os.environ)
    if args.fixed_threads:
        env["TDL_ADAPT_THREADS"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        root = data.make_synthetic_voc(os.path.join(tmp, "set"), n_train=200, n_val=1,
                                       size=128, seed=0)
        results = {0: [], 1: [], 2: []}
        for _ in range(args.rounds):
            for k in results:
                results[k].append(train_seconds(root, args.iterations, k, env))
    print(f"# training under load: tiny DeepLab, batch 4, 113², {args.iterations} iterations "
          f"(the first 5 left out), {os.cpu_count()} cores, {args.rounds} rounds; "
          f"adaptation {'off' if args.fixed_threads else 'on'}")
    print(f"# {_threads.describe()}")
    print("| competing processes | seconds (median) | × alone |")
    print("|---|---|---|")
    alone = statistics.median(results[0])
    for k, times in results.items():
        t = statistics.median(times)
        print(f"| {k} | {t:.1f} | {t / alone:.2f} |")


if __name__ == "__main__":
    main()
