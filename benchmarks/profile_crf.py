"""Where the dense CRF's time goes: ours step by step, kernel launches, and the host's profile.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/profile_crf.py --device cuda

On the scene and with the two parameter sets of ``bench_crf.py`` (no pydensecrf needed):

1. Stages: the median over --repeat runs of each step of one CRF — inputs to the device, the
   unary, each kernel's lattice with its normalisation, the set-up of the one-launch mean
   field (GPU), the iterations, Q back to the host — each waited for (the GPU synchronised
   after it), so the times add up to a run that waits at every step.
2. Kernel launches per run (Numba's CUDA launches; on a GPU each costs the host tens of µs).
3. On a GPU: the one-launch mean field against the step-by-step one, in turns, in one process;
   on the CPU: the spatial kernel's message in one sweep against splat, blur and slice, and
   the two kernels' splats in one pass over Q against one after the other.
4. --cprofile: the host's functions by their own time over --repeat runs (cProfile).
"""
import argparse
import cProfile
import pstats
import statistics
import sys
import time

import tinydeeplab  # noqa: F401  first: thread set-up before NumPy (tinydeeplab/_threads.py)
import numpy as np

from tinydeeplab.benchmarks import add_image_argument, positive_int
from tinydeeplab.benchmarks.bench_crf import PARAMS, PHOTO, in_turns, make_scene, run_ours


def synchronise(device):
    if device == "cuda":
        from tinydeeplab.backend import has_cuda

        if has_cuda():
            import cupy

            cupy.cuda.get_current_stream().synchronize()


def stages(image, probs, p, device):
    """{step: seconds} of one CRF run (bench_crf.run_ours), each step waited for."""
    times = {}
    t0 = time.perf_counter()

    def done(name):
        nonlocal t0
        synchronise(device)
        t1 = time.perf_counter()
        times[name] = t1 - t0
        t0 = t1

    run_ours(image, probs, p, device, step=done)
    return times


class LaunchCounter:
    """Counts Numba CUDA kernel launches (on a GPU or under the simulator) while active."""

    def __enter__(self):
        from tinydeeplab.backend import cuda_simulator

        self.count = 0
        if cuda_simulator():
            from numba.cuda.simulator import kernel as k

            self.owner, self.name = k.FakeCUDAKernel, "__call__"
        else:
            from numba.cuda import dispatcher as k

            self.owner, self.name = k.CUDADispatcher, "call"
        self.original = original = getattr(self.owner, self.name)
        counter = self

        def counted(kernel, *args, **kwargs):
            if not getattr(kernel, "_device", False):  # (the simulator's device functions)
                counter.count += 1
            return original(kernel, *args, **kwargs)

        setattr(self.owner, self.name, counted)
        return self

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.original)


def settings_in_turns(image, probs, p, repeat, name, values, fixed=None):
    """Whole CPU runs with the size threshold permutohedral.cpu_fast.<name> set to each of
    ``values`` (two), in turns (``fixed``: other thresholds held at a value meanwhile):
    (median seconds of each, ratios second/first per round, max |ΔQ| between them, lattice
    sizes)."""
    from tinydeeplab.kernels.permutohedral import cpu_fast

    def with_value(value):
        def one_run():
            settings = dict(fixed or {}, **{name: value})
            defaults = {key: getattr(cpu_fast, key) for key in settings}
            for key, v in settings.items():
                setattr(cpu_fast, key, v)
            try:
                return run_ours(image, probs, p)
            finally:
                for key, v in defaults.items():
                    setattr(cpu_fast, key, v)
        return one_run

    times, (q_a, q_b) = in_turns([with_value(v) for v in values], repeat)
    ratios = [b / a for a, b in zip(*times)]
    return ([statistics.median(t) for t in times], ratios, np.abs(q_a[0] - q_b[0]).max(),
            q_a[1])


def cpu_choices(image, probs, p, repeat):
    """On the CPU, the two choices made by size, each measured both ways (whole runs, in
    turns): the first (spatial) kernel's message in one sweep (cpu_fast.stream_pays: vertex
    buffers over STREAM_BYTES) against splat, blur and slice; and, not streaming, the two
    kernels' splats in one pass over Q against one after the other (splat_together_pays:
    SPLAT_TOGETHER_BYTES)."""
    from tinydeeplab.kernels.permutohedral import cpu_fast

    C = probs.shape[0]
    never, always = float("inf"), 0
    (t_sweep, t_steps), ratios, dq, sizes = settings_in_turns(
        image, probs, p, repeat, "STREAM_BYTES", [always, never])
    spatial = (sizes[0] + 1) * C * 4
    lines = [f"spatial message in one sweep {1e3 * t_sweep:.2f} ms, splat/blur/slice "
             f"{1e3 * t_steps:.2f} ms: {statistics.median(ratios):.2f}× "
             f"[{min(ratios):.2f}-{max(ratios):.2f}]; max |ΔQ| {dq:.1e}; its buffer would be "
             f"{spatial / 2**20:.1f} MB, so by default "
             f"{'in one sweep' if cpu_fast.stream_pays(sizes[0] + 1, C) else 'in steps'}"]
    (t_apart, t_together), ratios, dq, sizes = settings_in_turns(
        image, probs, p, repeat, "SPLAT_TOGETHER_BYTES", [0, float("inf")],
        fixed={"STREAM_BYTES": never})
    both = sum((M + 1) * C * 4 for M in sizes)  # the float32 buffers
    ratios = [1 / r for r in ratios]
    lines.append(f"not streaming: two splats in one pass {1e3 * t_together:.2f} ms, one after "
                 f"the other {1e3 * t_apart:.2f} ms: {statistics.median(ratios):.2f}× "
                 f"[{min(ratios):.2f}-{max(ratios):.2f}]; max |ΔQ| {dq:.1e}; buffers "
                 f"{both / 2**20:.1f} MB together, so then "
                 f"{'in one pass' if cpu_fast.splat_together_pays(both) else 'apart'}")
    return "\n".join(lines)


def run(device="cpu", repeat=5, cprofile=False, size=(375, 500), out=sys.stdout, photo=PHOTO):
    image, probs, scene = make_scene(*size, photo=photo)
    C, H, W = probs.shape
    print(f"# dense CRF profile: {W}×{H} {scene}, {C} labels, 10 iterations, device={device}, "
          f"median of {repeat} runs", file=out)
    for name, p in PARAMS.items():
        print(f"\n## {name}", file=out)
        stages(image, probs, p, device)  # warm-up: compiles, fills the memory pool
        runs = [stages(image, probs, p, device) for _ in range(repeat)]
        print("| step | ms |\n|---|---|", file=out)
        for step in runs[0]:
            print(f"| {step} | {1e3 * statistics.median(r[step] for r in runs):.2f} |",
                  file=out)
        total = statistics.median(sum(r.values()) for r in runs)
        print(f"| all (each step waited for) | {1e3 * total:.2f} |", file=out)
        if device == "cuda":
            def step_by_step():  # the plain loop on the CUDA lattices
                return run_ours(image, probs, p, device, engine="plain")

            with LaunchCounter() as launches:
                run_ours(image, probs, p, device)
            with LaunchCounter() as launches_step:
                step_by_step()
            print(f"\nkernel launches per run: {launches.count} "
                  f"(plain loop: {launches_step.count})", file=out)

            (t_one, t_step), (q_one, q_step) = in_turns(
                [lambda: run_ours(image, probs, p, device), step_by_step], repeat)
            ratios = [b / a for a, b in zip(t_one, t_step)]
            print(f"one-launch mean field {1e3 * statistics.median(t_one):.2f} ms, step by "
                  f"loop {1e3 * statistics.median(t_step):.2f} ms (whole runs, in turns): "
                  f"{statistics.median(ratios):.2f}× [{min(ratios):.2f}-{max(ratios):.2f}]; "
                  f"max |ΔQ| {np.abs(q_one[0] - q_step[0]).max():.1e}", file=out)
        if device == "cpu":
            print("\n" + cpu_choices(image, probs, p, repeat), file=out)
        if cprofile:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(repeat):
                run_ours(image, probs, p, device)
            profile.disable()
            print(f"\nhost profile of {repeat} runs (own time):", file=out)
            pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeat", type=positive_int, default=5)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"),
                        help="image size (the simulator needs tiny ones)")
    add_image_argument(parser)
    args = parser.parse_args(argv)
    if min(args.size) < 1:
        parser.error(f"--size needs two positive numbers, got {args.size[0]} {args.size[1]}")
    run(args.device, args.repeat, args.cprofile, tuple(args.size), photo=args.image or PHOTO)


if __name__ == "__main__":
    main()
