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
