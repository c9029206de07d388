"""The `layoutgen` command.

    layoutgen quickstart [--out DIR] [--set key=value ...]   train a small autoencoder on generated layouts
    layoutgen train --config X.yaml [--out DIR] [--set ...]   train an autoencoder experiment
    layoutgen info                                            versions, devices and kernel paths

User mistakes (a missing config, a bad key) print one line on stderr and exit with status 2; nothing else does.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib import resources

EXIT_USAGE = 2


def _print_results(results: dict) -> None:
    print("\nresults:")
    for key, value in results.items():
        print(f"  {key:<32} {value:.4f}" if isinstance(value, float) else f"  {key:<32} {value}")


def cmd_train(args: argparse.Namespace) -> int:
    from layoutgen.training.autoencoder import train_autoencoder
    from layoutgen.training.experiment import load_experiment

    experiment = load_experiment(args.config, args.set)
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    print(f"training {args.config} -> {out}")
    _print_results(train_autoencoder(experiment, out, progress=not args.no_progress))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    config = resources.files("layoutgen.training").joinpath("quickstart.yaml")
    with resources.as_file(config) as path:
        args.config = str(path)
        args.out = args.out or os.path.join("runs", "quickstart")
        return cmd_train(args)


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import layoutgen
    print(f"layoutgen {layoutgen.__version__}")
    print(f"python    {platform.python_version()} ({platform.machine()})")
    print(f"torch     {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"device    {torch.cuda.get_device_name()}")
    for name in ("triton", "xformers", "nvidia.dali"):
        try:
            module = __import__(name, fromlist=["__version__"])
            print(f"{name:<9} {getattr(module, '__version__', 'installed')}")
        except ImportError:
            print(f"{name:<9} not installed")
    print("kernels   group_norm_silu: reference (PyTorch); attention: sdpa")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layoutgen", description="Fast layout-image generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", help="output folder (default: runs/<config name>)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set training.epochs=2 (repeatable)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = sub.add_parser("train", help="train an autoencoder experiment from a YAML config")
    train.add_argument("--config", required=True, help="experiment YAML (see experiments/)")
    add_run_options(train)
    train.set_defaults(func=cmd_train)

    quick = sub.add_parser("quickstart", help="train a small autoencoder on generated layouts (CPU, minutes)")
    add_run_options(quick)
    quick.set_defaults(func=cmd_quickstart)

    info = sub.add_parser("info", help="versions, devices and active kernel paths")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        message = " ".join(str(err).split())  # one line, even for a multi-line YAML parser message
        print(f"layoutgen {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"layoutgen {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
