"""Side-by-side benchmarks (installed as ``tinydeeplab.benchmarks``); see RESULTS.md."""
import argparse
import os


def positive_int(text):
    """argparse type for counts (--repeat, --rounds, --threads): an int ≥ 1, else a clear error
    (a zero would leave nothing to take the median of)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def add_timing_arguments(parser, repeat, rounds, threads=True,
                         rounds_help="blocks of ours, then the reference, in turns; a ratio "
                                     "is the median over them"):
    """The timing options the side-by-side benchmarks share, each a positive int checked
    before any work starts: --threads (default: all cores; where ``threads``), --repeat
    (timed runs in a block) and --rounds."""
    if threads:
        parser.add_argument("--threads", type=positive_int, default=None,
                            help="default: all cores")
    parser.add_argument("--repeat", type=positive_int, default=repeat)
    parser.add_argument("--rounds", type=positive_int, default=rounds, help=rounds_help)


def existing_file(path):
    """argparse type for input files (--image): a path to an existing file, else a clear
    error before any work starts."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path


def add_image_argument(parser):
    """--image for the CRF benchmarks: an existing file, checked before any work starts; by
    default None — the caller then takes the shared example photograph where it is found and
    a synthetic scene where not (``bench_crf.make_scene``), saying which.  (Not the
    photograph's path as the default: argparse would check a string default like a given
    path, and without ../shared — an installed package, the GPU machine — stop there.)"""
    parser.add_argument("--image", type=existing_file, default=None,
                        help="the photograph to use (default: the shared example im1.png where "
                             "it is found, else a synthetic scene)")


# ---- how busy the host was ---------------------------------------------------------------------
def cpu_ticks(stat="/proc/stat"):
    """The machine's CPU time counters since boot (Linux: user, nice, system, idle, iowait,
    irq, softirq, steal, in ticks), or None where there is no such file."""
    try:
        with open(stat) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    return [int(v) for v in fields[1:9]]


def steal_line(start, end=None):
    """A results line saying what share of the CPU time since ``start`` (a ``cpu_ticks()``)
    the hypervisor gave to other virtual machines ("steal"), or "" where it cannot tell.

    On a shared virtual machine the same benchmark runs slower while the host is busy, and not
    evenly: on machine B (benchmarks/RESULTS.md) a tiny training step took 52-56 ms instead of
    30 and PyTorch's 36-38 instead of 25, while one long GEMM lost a fifth (sgemm 361 GFLOP/s
    against 449).  Ratios measured at such a time are not comparable with calm ones; this line
    and the sgemm figure at the start let a reader tell them apart."""
    end = cpu_ticks() if end is None else end
    if start is None or end is None:
        return ""
    spent = [b - a for a, b in zip(start, end)]
    total = sum(spent)
    if total <= 0:
        return ""
    return (f"# host: {100 * spent[7] / total:.0f} % of the CPU time during the run went to "
            f"other virtual machines (steal, /proc/stat); idle {100 * spent[3] / total:.0f} %")


def print_steal_line(start, out):
    """Print ``steal_line(start)`` to ``out`` where there is something to say."""
    line = steal_line(start)
    if line:
        print(line, file=out)
