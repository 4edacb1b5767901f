"""One DeepLab v2 training step (forward, loss, backward) in tinydeeplab and PyTorch.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_model.py

Identical models (weights copied, see torch_twin.py), same input, same thread count, in one
process: the "tiny" configuration at batch 4 on 161×161 crops and ResNet-50 DeepLab v2 at
batch 1 on 321×321.  Time: --rounds rounds, each a block of --repeat steps of ours and then one
of torch (median within a block), each block after a pause and a warm-up step; the ratio is the
median of the per-round ratios, so that the slow drifts of a shared machine's speed cancel.
Peak memory: each framework's step in a fresh child process, the rise of its resident set
(VmHWM) during one step, after a warm-up step and malloc_trim (so memory the allocator kept
from the warm-up does not hide the peak).
Also reports the batch norm + ReLU fusion (the same tiny step with the fusion switched off)
and, for every model, the step with the ASPP head computed branch by branch instead of as one
convolution (``kernels/aspp.py``) and with each of the convolution ladder's last three CPU
rungs.

``--device cuda`` (CuPy and a CUDA build of PyTorch on a GPU): ResNet-101 DeepLab v2 (ASPP,
output stride 8) on 321² crops at batch 10 (the paper's) and 2, forward + loss + backward + SGD
update, ours (CuPy arrays, our CUDA kernels) against the twin (cuDNN, float32, TF32 off; the
TF32 figure beside it), in turns, each step ending with a device synchronisation.  Memory: the
peak of bytes in use during one step (CuPy's pool, tracked by an allocator hook, against
``torch.cuda.max_memory_allocated``), weights, gradients and momentum included for both.
Profile: where one of our steps spends its time by kernel family (each call synchronised).
"""
import argparse
import json
import os
import subprocess
import sys

import tinydeeplab  # noqa: F401  first: thread set-up before NumPy (tinydeeplab/_threads.py)
import numpy as np

from tinydeeplab.benchmarks import add_timing_arguments, cpu_ticks, print_steal_line

CASES = {"tiny": ("tiny", 4, 161), "resnet50": ("resnet50", 1, 321),
         "resnet101": ("resnet101", 1, 321)}


def _random_batch(batch, size, classes=21):
    """Images and labels at the logits' 1/8 resolution, a few rows void (255)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    out = (size - 1) // 8 + 1
    target = rng.integers(0, classes, (batch, out, out))
    target[:, :3] = 255
    return x, target


def _step_functions(name, batch, size, threads):
    import torch

    import numba
    import tinydeeplab.functional as F
    from tinydeeplab import Tensor

    from tinydeeplab.benchmarks.torch_twin import paired

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    ours, body, twin = paired(name, 8, num_classes=21)
    ours.train()
    body.train()
    x, target = _random_batch(batch, size)
    xt, tt = torch.tensor(x), torch.tensor(target)

    def step_ours():
        ours.zero_grad()
        F.cross_entropy(ours(Tensor(x)), target).backward()

    def step_torch():
        body.zero_grad()
        torch.nn.functional.cross_entropy(twin(xt), tt, ignore_index=255).backward()

    return ours, step_ours, step_torch


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return -1


def child(framework, name, batch, size, threads):
    """Run in a subprocess: warm-up step, reset the peak, one step, print the rise in MB."""
    _, step_ours, step_torch = _step_functions(name, batch, size, threads)
    step = step_ours if framework == "ours" else step_torch
    step()
    try:  # give the freed heap back to the OS, so the next step's peak shows as a rise
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
    except OSError:
        pass
    step()
    print(json.dumps({"peak_rise_mb": (_rss_kb("VmHWM") - before) / 1024}))


def peak_memory(framework, name, batch, size, threads):
    out = subprocess.run([sys.executable, __file__, "--child", framework, name, str(batch),
                          str(size), str(threads)], capture_output=True, text=True)
    if out.returncode != 0:
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rise_mb"]


GPU_CASES = {"resnet101-b10": ("resnet101", 10, 321), "resnet101-b2": ("resnet101", 2, 321),
             "tiny": ("tiny", 16, 161)}


def _gpu_step_functions(name, batch, size, lr=1e-3):
    """Ours and the twin on the GPU, each a full SGD step ending in a synchronisation."""
    import cupy
    import torch

    import tinydeeplab.functional as F
    from tinydeeplab import Tensor
    from tinydeeplab.benchmarks.torch_twin import paired
    from tinydeeplab.optim import SGD

    ours, _, twin = paired(name, 8, num_classes=21)
    ours.to("cuda").train()
    twin.cuda().train()
    opt_ours = SGD(ours.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    opt_torch = torch.optim.SGD(twin.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    x, target = _random_batch(batch, size)
    x_ours, t_ours = cupy.asarray(x), cupy.asarray(target)
    x_torch, t_torch = torch.tensor(x, device="cuda"), torch.tensor(target, device="cuda")
    sync_ours, sync_torch = cupy.cuda.Device().synchronize, torch.cuda.synchronize

    def step_ours():
        opt_ours.zero_grad()
        F.cross_entropy(ours(Tensor(x_ours)), t_ours).backward()
        opt_ours.step()
        sync_ours()

    def step_torch():
        opt_torch.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(twin(x_torch), t_torch, ignore_index=255).backward()
        opt_torch.step()
        sync_torch()

    return step_ours, step_torch


def batch_copy_times(batch, size, repeat=20, rounds=3):
    """Seconds to copy one training batch (float32 images and full-size uint8 labels) to the
    GPU: from ordinary (pageable) host memory, from page-locked (pinned) memory the batch
    already sits in, and staged through pinned memory (a host copy first).  Pinned memory
    pays only if the difference matters next to a step's time."""
    import cupy
    import cupyx

    from tinydeeplab.benchmarks.bench_conv import block_times

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, 21, (batch, size, size)).astype(np.uint8)
    pinned_x, pinned_labels = cupyx.empty_pinned(x.shape, x.dtype), \
        cupyx.empty_pinned(labels.shape, labels.dtype)
    pinned_x[...], pinned_labels[...] = x, labels
    sync = cupy.cuda.Device().synchronize

    def pageable():
        cupy.asarray(x), cupy.asarray(labels)
        sync()

    def pinned():
        cupy.asarray(pinned_x), cupy.asarray(pinned_labels)
        sync()

    def staged():
        pinned_x[...], pinned_labels[...] = x, labels
        pinned()

    times = block_times([pageable, pinned, staged], repeat, rounds, pause=0.05)
    return tuple(np.median(times, axis=0)), x.nbytes + labels.nbytes


def _cupy_peak_bytes(step):
    """Peak bytes in use in CuPy's pool during ``step`` (after a warm-up step)."""
    import cupy

    pool = cupy.get_default_memory_pool()
    step()
    peak = [pool.used_bytes()]

    def allocate(size):
        memory = pool.malloc(size)
        peak[0] = max(peak[0], pool.used_bytes())
        return memory

    cupy.cuda.set_allocator(allocate)
    try:
        step()
    finally:
        cupy.cuda.set_allocator(pool.malloc)
    return peak[0]


def _torch_peak_bytes(step):
    import torch

    step()
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated()


def profile_by_kernel(step, sync):
    """Seconds of one step by kernel family (each call synchronised); "other" is the rest:
    CuPy's element-wise operations, the loss, the SGD update and Python."""
    import time

    from tinydeeplab.kernels import atrous_conv, batch_norm, bilinear, max_pool

    families = {"conv forward": (atrous_conv, "conv2d_forward"),
                "conv backward": (atrous_conv, "conv2d_backward"),
                "batch norm forward": (batch_norm, "batch_norm_forward"),
                "batch norm backward": (batch_norm, "batch_norm_backward"),
                "max-pool": (max_pool, "max_pool2d_forward"),
                "max-pool backward": (max_pool, "max_pool2d_backward"),
                "bilinear": (bilinear, "bilinear_forward"),
                "bilinear backward": (bilinear, "bilinear_backward")}
    spent = dict.fromkeys(families, 0.0)
    originals = {}
    for family, (module, name) in families.items():
        originals[family] = getattr(module, name)

        def timed(*args, _family=family, _call=originals[family], **kwargs):
            sync()
            t0 = time.perf_counter()
            result = _call(*args, **kwargs)
            sync()
            spent[_family] += time.perf_counter() - t0
            return result
        setattr(module, name, timed)
    try:
        step()  # warm-up with the hooks in place
        spent.update(dict.fromkeys(families, 0.0))
        t0 = time.perf_counter()
        step()
        total = time.perf_counter() - t0
    finally:
        for family, (module, name) in families.items():
            setattr(module, name, originals[family])
    spent["other"] = total - sum(spent.values())
    return total, spent


def run_cuda(repeat=3, out=sys.stdout, cases=("resnet101-b10", "resnet101-b2"), rounds=4):
    import cupy
    import torch

    from tinydeeplab.benchmarks.bench_conv import block_times, quiet_small_grid_warnings

    quiet_small_grid_warnings()
    card = torch.cuda.get_device_name()
    print(f"# DeepLab v2 training step (forward, loss, backward, SGD), float32, {card}; "
          f"CuPy {cupy.__version__}, PyTorch {torch.__version__}, cuDNN "
          f"{torch.backends.cudnn.version()}", file=out)
    print(f"# time: median of {rounds} rounds (each: a block of {repeat} steps of ours, then of "
          "torch); ratio: median of the per-round ratios [range]; torch TF32 off, and on in "
          "the last column", file=out)
    print("| model | batch × size | ours s | torch s | ours/torch | torch TF32 s | "
          "peak MB ours | peak MB torch | memory ratio |", file=out)
    print("|---|---|---|---|---|---|---|---|---|", file=out)
    profiles, copies = [], []
    for label in cases:
        name, batch, size = GPU_CASES[label]
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        step_ours, step_torch = _gpu_step_functions(name, batch, size)
        times = np.array(block_times([step_ours, step_torch], repeat, rounds, pause=0.05))
        t_ours, t_torch = np.median(times, axis=0)
        ratios = times[:, 0] / times[:, 1]
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
        t_tf32 = np.median([row[0] for row in block_times([step_torch], repeat, 2, pause=0.05)])
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        m_ours = _cupy_peak_bytes(step_ours) / 2**20
        m_torch = _torch_peak_bytes(step_torch) / 2**20
        print(f"| {name} | {batch} × {size}² | {t_ours:.3f} | {t_torch:.3f} | "
              f"{np.median(ratios):.2f} [{ratios.min():.2f}-{ratios.max():.2f}] | "
              f"{t_tf32:.3f} | {m_ours:.0f} | {m_torch:.0f} | {m_ours / m_torch:.2f} |",
              file=out)
        profiles.append((label, *profile_by_kernel(step_ours, cupy.cuda.Device().synchronize)))
        (t_pageable, t_pinned, t_staged), nbytes = batch_copy_times(batch, size)
        copies.append(f"one batch to the GPU ({label}, {nbytes / 2**20:.1f} MB): pageable "
                      f"{t_pageable * 1e3:.2f} ms, pinned {t_pinned * 1e3:.2f} ms, staged "
                      f"through pinned {t_staged * 1e3:.2f} ms; our step {t_ours * 1e3:.0f} ms")
        del step_ours, step_torch
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    for label, total, spent in profiles:
        print(f"\nwhere ours spends one step ({label}, each kernel call synchronised: "
              f"{total:.3f} s):", file=out)
        for family, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
            print(f"  {family:20s} {seconds:7.3f} s  {100 * seconds / total:5.1f} %", file=out)
    print("", *copies, sep="\n", file=out)


def _steps_with(step, setter, values):
    """One step function per value: each calls ``setter(value)`` (a switch of the library,
    such as a kernel variant), then ``step``; timed in turns, they compare the settings."""
    def make(value):
        def run():
            setter(value)
            step()
        return run
    return [make(v) for v in values]


def run(threads=None, repeat=3, out=sys.stdout, models=tuple(CASES), rounds=6):
    from tinydeeplab import nn
    from tinydeeplab.kernels import atrous_conv as conv_k
    from tinydeeplab.kernels import batch_norm as bn_k
    from threadpoolctl import threadpool_limits

    from tinydeeplab.benchmarks.bench_conv import (blas_info, block_times, gemm_gflops,
                                                   median_times_in_blocks)

    threads = threads or os.cpu_count()
    ticks = cpu_ticks()
    print(f"# DeepLab v2 training step, float32, CPU, {threads} threads; BLAS: {blas_info()}",
          file=out)
    with threadpool_limits(limits=threads, user_api="blas"):
        print(f"# NumPy sgemm 1024³ roofline: {gemm_gflops(threads):.1f} GFLOP/s (the host's "
              "speed at the start)", file=out)
    print(f"# time: median of {rounds} rounds (each: a block of {repeat} steps of ours, then of "
          "torch; median within a block); ratio: median of the per-round ratios [range]",
          file=out)
    print("| model | batch × size | ours s | torch s | ours/torch | peak MB ours | "
          "peak MB torch | memory ratio |", file=out)
    print("|---|---|---|---|---|---|---|---|", file=out)
    for label, (name, batch, size) in CASES.items():
        if label not in models:
            continue
        ours, step_ours, step_torch = _step_functions(name, batch, size, threads)
        times = np.array(block_times([step_ours, step_torch], repeat, rounds))
        t_ours, t_torch = np.median(times, axis=0)
        ratios = times[:, 0] / times[:, 1]
        m_ours = peak_memory("ours", name, batch, size, threads)
        m_torch = peak_memory("torch", name, batch, size, threads)
        print(f"| {label} | {batch} × {size}² | {t_ours:.3f} | {t_torch:.3f} | "
              f"{np.median(ratios):.2f} [{ratios.min():.2f}-{ratios.max():.2f}] | "
              f"{m_ours:.0f} | {m_torch:.0f} | "
              f"{m_ours / m_torch:.2f} |", file=out)
        # the ASPP head as one convolution, then branch by branch, in the same rounds
        t = np.array(block_times(_steps_with(step_ours, lambda flag: setattr(
            ours.head, "stacked", flag), (True, False)), repeat, rounds))
        ours.head.stacked = True
        r = t[:, 0] / t[:, 1]
        print(f"\nASPP as one convolution / branch by branch (ours, {label} step): "
              f"{np.median(t[:, 0]):.3f} / {np.median(t[:, 1]):.3f} s, {np.median(r):.2f} "
              f"[{r.min():.2f}-{r.max():.2f}] over {rounds} rounds; the table uses one", file=out)
        # the convolution ladder's last three rungs, in turns
        default = conv_k.DEFAULT["cpu"]
        rungs = [v for v, spec in conv_k.VARIANTS.items() if spec.device == "cpu"][-3:]
        t = np.array(block_times(_steps_with(step_ours, lambda v: conv_k.DEFAULT.update(
            cpu=v), rungs), repeat, rounds))
        conv_k.DEFAULT["cpu"] = default
        r = t[:, 2] / t[:, 1]
        print(f"\n(atrous conv {' / '.join(rungs)}, ours, {label} step: "
              f"{' / '.join(f'{s:.3f}' for s in np.median(t, axis=0))} s; {rungs[2]} / "
              f"{rungs[1]} {np.median(r):.2f} [{r.min():.2f}-{r.max():.2f}] over {rounds} "
              f"rounds; the table uses {default})\n", file=out)
        if name == "tiny":  # the batch norm + ReLU fusion, measured in the same blocks
            t_fused, t_separate = median_times_in_blocks(_steps_with(
                step_ours, lambda flag: setattr(nn, "FUSE_BN_RELU", flag), (True, False)),
                repeat)
            nn.FUSE_BN_RELU = True
            print(f"\nbatch norm + ReLU fused vs separate (ours, {label} step): "
                  f"{t_fused:.3f} s vs {t_separate:.3f} s", file=out)

            default = bn_k.DEFAULT["cpu"]  # the batch norm ladder, in the same blocks
            t_v1, t_v3, t_v2 = median_times_in_blocks(_steps_with(
                step_ours, lambda v: bn_k.DEFAULT.update(cpu=v), ("cpu_v1", "cpu_v3", "cpu_v2")),
                repeat)
            bn_k.DEFAULT["cpu"] = default
            print(f"batch norm kernels cpu_v1 / cpu_v3 / cpu_v2 (ours, {label} step): "
                  f"{t_v1:.3f} / {t_v3:.3f} / {t_v2:.3f} s; the table uses {default}\n",
                  file=out)
    print_steal_line(ticks, out)


DEFAULT_MODELS = {"cpu": ("tiny", "resnet50"), "cuda": ("resnet101-b10", "resnet101-b2")}


def choose_models(text, device):
    """The cases named in ``text`` ("tiny,resnet50"; None: DEFAULT_MODELS) for ``device``;
    a ValueError naming the unknown ones and the choices."""
    cases = GPU_CASES if device == "cuda" else CASES
    models = tuple(text.split(",")) if text else DEFAULT_MODELS[device]
    unknown = sorted(set(models) - set(cases))
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; choose from {list(cases)} for "
                         f"--device {device}")
    return models


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        framework, name, batch, size, threads = argv[1:]
        return child(framework, name, int(batch), int(size), int(threads))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser, repeat=3, rounds=6,
                         rounds_help="blocks of ours then torch; the ratio is their median")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated, from {list(CASES)} (default tiny,resnet50); "
                        f"with --device cuda from {list(GPU_CASES)} (default "
                        "resnet101-b10,resnet101-b2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    try:
        models = choose_models(args.models, args.device)
    except ValueError as e:
        parser.error(str(e))
    if args.device == "cuda":
        from tinydeeplab.backend import has_cuda

        if not has_cuda():
            parser.error("--device cuda: CuPy sees no GPU here")
        return run_cuda(args.repeat, cases=models, rounds=args.rounds)
    run(args.threads, args.repeat, models=models, rounds=args.rounds)


if __name__ == "__main__":
    main()
