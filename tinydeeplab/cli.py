"""The ``tinydeeplab`` command line."""
import argparse
import sys


def _demo(args):
    from . import demo

    demo.run(iterations=args.iterations, seed=args.seed)


def _bench(args):
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("tinydeeplab bench compares against PyTorch, which is not installed: "
                 "pip install 'tinydeeplab[test]'")
    from .benchmarks import bench_conv

    bench_conv.run(device=args.device, threads=args.threads, repeat=args.repeat)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="tinydeeplab", description="DeepLab v2 rebuilt by hand: kernels, autograd, CRF.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"tinydeeplab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="train a small atrous network on a toy segmentation task "
                                       "(CPU, under a minute) and report mIoU")
    demo.add_argument("--iterations", type=int, default=300, help="SGD steps (default 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="atrous convolution forward+backward against PyTorch "
                                         "(needs the [test] extra)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench.add_argument("--threads", type=int, default=None, help="default: all cores")
    bench.add_argument("--repeat", type=int, default=5)
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "iterations", 1) < 1:
        sys.exit("--iterations must be ≥ 1")
    args.func(args)


if __name__ == "__main__":
    main()
