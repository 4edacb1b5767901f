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
    if args.what in ("conv", "all"):
        from .benchmarks import bench_conv

        bench_conv.run(device=args.device, threads=args.threads, repeat=args.repeat)
    if args.what in ("crf", "all"):
        try:
            import pydensecrf  # noqa: F401
        except ImportError:
            sys.exit("tinydeeplab bench crf compares against pydensecrf, which is not "
                     "installed: pip install 'tinydeeplab[test]'")
        from .benchmarks import bench_crf

        bench_crf.run(device=args.device, repeat=args.repeat)


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

    bench = sub.add_parser("bench", help="our kernels side by side with PyTorch (convolution) "
                                         "and pydensecrf (CRF); needs the [test] extra")
    bench.add_argument("what", nargs="?", choices=["conv", "crf", "all"], default="all",
                       help="which benchmark (default: all)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench.add_argument("--threads", type=int, default=None, help="default: all cores")
    bench.add_argument("--repeat", type=int, default=5, help="timed runs per block")
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "iterations", 1) < 1:
        sys.exit("--iterations must be ≥ 1")
    args.func(args)


if __name__ == "__main__":
    main()
