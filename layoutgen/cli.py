"""The `layoutgen` command.

    layoutgen quickstart [--out DIR] [--set key=value ...]   train a small autoencoder on generated layouts
    layoutgen train --config X.yaml [--out DIR] [--set ...]   train an autoencoder experiment
    layoutgen info                                            versions, devices and kernel paths
    layoutgen data synth --out DIR [--num N --size S --seed K]  write procedural layouts and a manifest.csv
    layoutgen embed --autoencoder CKPT --manifest M --out DIR   pre-embed every image into latents (resumable)

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
    from layoutgen.kernels import get_attention_backend, get_backend
    from layoutgen.kernels.noise_ops import describe_path
    backend = get_backend()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gn_path = "triton" if backend == "triton" or (backend == "auto" and device == "cuda") else "reference (PyTorch)"
    print(f"kernels   backend {backend}: group_norm_silu on {device}: {gn_path}; "
          f"attention: {get_attention_backend()}")
    print(f"          noise_ops: {describe_path()}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from layoutgen.models.datasets.synthetic import write_synthetic_dataset

    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.size < 32:
        raise ValueError(f"--size must be >= 32, got {args.size}")
    if not 0.0 <= args.empty_prob <= 1.0:
        raise ValueError(f"--empty-prob must be in [0, 1], got {args.empty_prob}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} exists and is not a folder")
    start = time.perf_counter()
    manifest = write_synthetic_dataset(args.out, num=args.num, size=args.size, seed=args.seed,
                                       empty_prob=args.empty_prob)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.num} layouts of {args.size}x{args.size} to {args.out} in {elapsed:.1f} s "
          f"({args.num / max(elapsed, 1e-9):.0f}/s); manifest: {manifest}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from layoutgen.models.datasets.embed import embed_manifest

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not os.path.isfile(args.autoencoder):
        raise FileNotFoundError(f"autoencoder checkpoint not found: {args.autoencoder}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    summary = embed_manifest(args.autoencoder, args.manifest, args.out, batch_size=args.batch_size,
                             device=args.device, amp=args.amp, image_size=args.image_size,
                             num_workers=args.num_workers, on_error=args.on_error, progress=not args.no_progress)
    print(f"embedded {summary['embedded']} images ({summary['already_embedded']} already done, "
          f"{summary['skipped']} skipped) -> {summary['manifest']}; latent shape {summary['latent_shape']}")
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

    data = sub.add_parser("data", help="data sets: generate synthetic layouts")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write procedural floor plans (PNGs) and a manifest.csv")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--num", type=int, default=1000, help="number of layouts (default 1000)")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels (default 128, >= 32)")
    synth.add_argument("--seed", type=int, default=0, help="layout i is drawn from (seed, i) (default 0)")
    synth.add_argument("--empty-prob", type=float, default=0.05, help="share of empty canvases (default 0.05)")
    synth.set_defaults(func=cmd_data_synth)

    embed = sub.add_parser("embed", help="encode every image of a manifest into latents with a frozen autoencoder")
    embed.add_argument("--autoencoder", required=True, help="autoencoder checkpoint (.safetensors)")
    embed.add_argument("--manifest", required=True, help="input manifest.csv (needs layout_path)")
    embed.add_argument("--out", required=True, help="output folder: latents/ and a manifest.csv with latent_path")
    embed.add_argument("--batch-size", type=int, default=16)
    embed.add_argument("--image-size", type=int, default=None, help="resize images first (default: as stored)")
    embed.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    embed.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"),
                       help="autocast while encoding (auto: bf16 on CUDA, none on the CPU)")
    embed.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    embed.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                       help="missing or corrupt images: stop (default) or skip them")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    embed.set_defaults(func=cmd_embed)
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
