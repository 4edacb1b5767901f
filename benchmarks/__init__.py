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
