"""The `layoutgen` command.

    layoutgen quickstart [--out DIR] [--set key=value ...] [--resume]  data -> autoencoder -> diffusion -> samples
    layoutgen train --config X.yaml [--out DIR] [--set ...] [--resume]  train any experiment kind
    layoutgen sample --checkpoint D.safetensors --num N --out DIR   sample a PNG grid from a diffusion model
                     [--control DIR|manifest.csv|synthetic]      (a ControlNet's: controls beside samples)
    layoutgen eval --checkpoint C --out DIR [--control ...]     reconstruction or generation metrics -> metrics.json
    layoutgen info                                            versions, devices and kernel paths
    layoutgen data synth --out DIR [--num N --size S --seed K]  write procedural layouts and a manifest.csv
    layoutgen embed --autoencoder CKPT --manifest M --out DIR   pre-embed every image into latents (resumable)
    layoutgen bench [--quick] [--suite ops|models|all] [--compile-matrix] [--out DIR] [--device auto|cpu|cuda]
                                                              op and model benchmarks -> JSON, CSV, markdown, PNGs
    layoutgen profile --config X.yaml --steps N [--out DIR] [--set ...]   torch.profiler trace of training steps

User mistakes (a missing config, a bad key) print one line on stderr and exit with status 2; nothing else does.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

EXIT_USAGE = 2


def _print_results(results: dict) -> None:
    print("\nresults:")
    for key, value in results.items():
        print(f"  {key:<32} {value:.4f}" if isinstance(value, float) else f"  {key:<32} {value}")


def cmd_train(args: argparse.Namespace) -> int:
    from layoutgen.training.experiment import load_any_experiment

    kind, experiment = load_any_experiment(args.config, args.set)
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    from layoutgen.training import distributed
    from layoutgen.training.run import run_experiment
    # Every kind (autoencoder, diffusion, controlnet) goes through the Trainer, so all of them resume (--resume) and
    # run under `torchrun --nproc_per_node K -m layoutgen train ...`, where every process joins one group here.
    distributed.init_from_env()
    main_process = distributed.is_main()
    if main_process:
        print(f"training {args.config} ({kind}) -> {out}")
    try:
        summary = run_experiment(kind, experiment, out, resume=getattr(args, "resume", False),
                                 progress=not args.no_progress and main_process)
    finally:
        distributed.cleanup()
    if main_process:
        _print_results({k: v for k, v in summary.items() if v is not None})
    return 0


def _parse_labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--labels: expected comma-separated class indices, e.g. 0,1,2; got {text!r}") from None


def _write_latents(path: str, latents, labels, control=None) -> None:
    from layoutgen.utils.atomic import atomic_write_bytes
    from safetensors.torch import save as save_tensors

    tensors = {"latents": latents.contiguous()}
    if labels is not None:
        tensors["labels"] = labels.contiguous()
    if control is not None:
        tensors["control"] = control.float().contiguous()
    atomic_write_bytes(path, save_tensors(tensors))


def _controls_for(model, args: argparse.Namespace):
    """The --control images of a ControlNet checkpoint; None for any other model (which must not get --control)."""
    from layoutgen.models.controlnet_diffusion import ControlNetDiffusion

    if not isinstance(model, ControlNetDiffusion):
        if args.control:
            raise ValueError(f"--control: the checkpoint holds a {type(model).__name__}, not a ControlNetDiffusion; "
                             f"leave --control out")
        return None
    if not args.control:
        raise ValueError("--control: missing; a ControlNet checkpoint samples inside control images: give a folder "
                         "of them, a manifest.csv with control_path, or 'synthetic'")
    from layoutgen.training.control_sampling import load_controls
    return load_controls(args.control, model, args.num, args.seed)


def _sample(model, control, args: argparse.Namespace, device: str):
    """(latents, images or None, labels) of `model`: with `control` through the ControlNet, else plain."""
    if control is None:
        from layoutgen.training.run import generate
        return generate(model, args.num, _parse_labels(args.labels), args.steps, args.sampler, args.guidance,
                        args.seed, device)
    from layoutgen.training.control_sampling import sample_with_control
    return sample_with_control(model, control, _parse_labels(args.labels), args.steps, args.sampler, args.guidance,
                               args.seed, device)


def _save_grid(path: str, images, control, nrow: int | None) -> tuple[int, int]:
    """samples.png: the images, or each control beside its sample."""
    from layoutgen.training.run import save_image_grid

    if control is not None:
        from layoutgen.training.control_sampling import control_grid
        images, nrow = control_grid(control, images, nrow)
    return save_image_grid(path, images, nrow=nrow)


def cmd_sample(args: argparse.Namespace) -> int:
    from layoutgen.training.autoencoder import resolve_device
    from layoutgen.training.run import latents_preview, load_model

    model = load_model(args.checkpoint)
    device = str(resolve_device(args.device))
    control = _controls_for(model, args)
    latents, images, labels = _sample(model, control, args, device)
    os.makedirs(args.out, exist_ok=True)
    _write_latents(os.path.join(args.out, "latents.safetensors"), latents, labels, control)
    if images is None:
        print("no autoencoder in this checkpoint: the grid shows the first three latent channels")
        images = latents_preview(latents)
    width, height = _save_grid(os.path.join(args.out, "samples.png"), images, control, args.nrow)
    print(f"wrote {latents.shape[0]} samples{' beside their controls' if control is not None else ''} -> "
          f"{os.path.join(args.out, 'samples.png')} ({width}x{height}) and latents.safetensors "
          f"{tuple(latents.shape)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from torch.utils.data import DataLoader

    from layoutgen.models.autoencoder import Autoencoder
    from layoutgen.models.diffusion import DiffusionModel
    from layoutgen.training.autoencoder import evaluate, resolve_device
    from layoutgen.training.run import classifier_of, load_model
    from layoutgen.utils.atomic import atomic_write_text

    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    model = load_model(args.checkpoint)
    device = resolve_device(args.device)
    control = _controls_for(model, args)
    if isinstance(model, Autoencoder):
        if args.manifest:
            from layoutgen.models.datasets.datasets import ManifestDataset, build_torch_loader
            if not os.path.isfile(args.manifest):
                raise FileNotFoundError(f"--manifest: file not found: {args.manifest}")
            dataset = ManifestDataset(args.manifest, image_size=args.size)
            loader = build_torch_loader(dataset, args.batch_size, shuffle=False)
        else:
            from layoutgen.models.datasets.synthetic import SyntheticLayoutDataset
            dataset = SyntheticLayoutDataset(args.num, size=args.size or 64, seed=args.seed)
            loader = DataLoader(dataset, batch_size=args.batch_size)
        results = {"kind": "autoencoder", "num_images": len(dataset),
                   **evaluate(model.to(device), loader, device)}
    elif isinstance(model, DiffusionModel):
        if args.manifest:
            raise ValueError("--manifest: a diffusion checkpoint is evaluated on its own samples; leave it out")
        latents, images, labels = _sample(model, control, args, str(device))
        if images is None:
            raise ValueError("--checkpoint: the diffusion model has no autoencoder to decode its samples with "
                             "(set diffusion.autoencoder_checkpoint when training)")
        from layoutgen.evaluation.generation import evaluate_generation
        classifier = classifier_of(model.autoencoder) if labels is not None else None
        outlines = None
        if control is not None:
            from layoutgen.training.control_sampling import control_iou_outlines
            outlines = control_iou_outlines(control, images)   # None (no IoU) for a multi-channel control
            os.makedirs(args.out, exist_ok=True)
            _save_grid(os.path.join(args.out, "samples.png"), images, control, None)
        results = {"kind": "diffusion" if control is None else "controlnet", "num_samples": images.shape[0],
                   **evaluate_generation(images, labels=labels if classifier else None, classifier=classifier,
                                         outlines=outlines)}
    else:
        raise ValueError(f"--checkpoint: holds a {type(model).__name__}; eval takes an autoencoder or a "
                         f"diffusion checkpoint")
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "metrics.json"), json.dumps(results, indent=2) + "\n")
    _print_results(results)
    print(f"metrics -> {os.path.join(args.out, 'metrics.json')}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from layoutgen.training.quickstart import format_results, load_quickstart_config, run_quickstart

    cfg = load_quickstart_config(args.config, args.set)
    out = args.out or os.path.join("runs", "quickstart")
    print(f"quickstart -> {out}: generated floor plans -> autoencoder -> latents -> class-conditional diffusion "
          f"-> samples and their evaluation", flush=True)
    results = run_quickstart(cfg, out, resume=args.resume, progress=not args.no_progress)
    print("\nevaluation (samples: the diffusion model's, decoded; reconstructed: the autoencoder's own "
          "reconstructions of real layouts; real: the layouts themselves):")
    print(format_results(results))
    print(f"\nsamples -> {os.path.join(out, 'samples.png')}, metrics -> {os.path.join(out, 'metrics.json')} "
          f"({results['seconds'] / 60:.1f} min)")
    return 0


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
    from layoutgen.kernels.backend import group_norm_chunked_path, use_triton
    from layoutgen.kernels.noise_ops import describe_path
    backend = get_backend()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:  # the ops' own rule, asked of an empty bf16 tensor: what a training step's activations would take
        probe = torch.empty(0, device=device, dtype=torch.bfloat16)
        gn_path = (f"triton (groups too large for registers: {group_norm_chunked_path.get()} kernels)"
                   if use_triton(probe) else "reference (PyTorch)")
    except RuntimeError as error:  # backend 'triton' without triton installed: the ops would refuse to run
        gn_path = f"refused: {error}"
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


def cmd_bench(args: argparse.Namespace) -> int:
    from layoutgen.bench.report import markdown_report
    from layoutgen.bench.run import run_bench

    result, files = run_bench(quick=args.quick, suite=args.suite, out=args.out, device=args.device,
                              compile_matrix=args.compile_matrix, threads=args.threads)
    print(markdown_report(result))
    print(f"finished in {result['seconds']:.0f} s; wrote " + ", ".join(files.values()))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from layoutgen.bench.profile import profile_experiment

    profile_experiment(args.config, args.steps, out=args.out, device=args.device, overrides=args.set, top=args.top,
                       threads=args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layoutgen", description="Fast layout-image generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_run_options(p: argparse.ArgumentParser, out: str = "runs/<config name>",
                        example: str = "training.epochs=2") -> None:
        p.add_argument("--out", help=f"output folder (default: {out})")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override a config key, e.g. --set {example} (repeatable)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = sub.add_parser("train", help="train an experiment (autoencoder, diffusion or controlnet) from a YAML")
    train.add_argument("--config", required=True, help="experiment YAML (see experiments/)")
    add_run_options(train)
    train.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoints/latest.safetensors (any experiment kind)")
    train.set_defaults(func=cmd_train)

    def add_sampling_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, help="model checkpoint (.safetensors)")
        p.add_argument("--labels", help="class indices cycled over the samples, e.g. 0,1,2 (default: every class)")
        p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
        p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: the model's")
        p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--control", help="ControlNet checkpoints: control images (outlines) to sample inside: a "
                                         "folder, a manifest.csv with control_path, or 'synthetic' (built-in "
                                         "outlines); one sample per image, at most --num")

    sample = sub.add_parser("sample", help="sample a PNG grid (and latents) from a diffusion checkpoint")
    add_sampling_options(sample)
    sample.add_argument("--num", type=int, default=16, help="number of samples (default 16)")
    sample.add_argument("--nrow", type=int, default=None, help="images per grid row (default ceil(sqrt(num)))")
    sample.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="metrics of a checkpoint -> OUT/metrics.json: reconstruction for an "
                                     "autoencoder, generation for a diffusion model")
    add_sampling_options(ev)
    ev.add_argument("--num", type=int, default=64,
                    help="diffusion: samples to generate; autoencoder: synthetic layouts (default 64)")
    ev.add_argument("--manifest", help="autoencoder: evaluate on this manifest instead of synthetic layouts")
    ev.add_argument("--size", type=int, default=None, help="image size (synthetic default 64; manifest: as stored)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.set_defaults(func=cmd_eval)

    quick = sub.add_parser("quickstart", help="the whole pipeline on generated layouts: data, autoencoder, latents, "
                                              "class-conditional diffusion, a sample grid and its evaluation "
                                              "(about 10 minutes on 2 CPU cores)")
    add_run_options(quick, out="runs/quickstart", example="diffusion.training.max_steps=2000")
    quick.add_argument("--config", default=None,
                       help="quickstart YAML (default: the packaged layoutgen/training/quickstart.yaml)")
    quick.add_argument("--resume", action="store_true",
                       help="keep the generated data and latents, continue each training stage from its checkpoint")
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

    bench = sub.add_parser("bench", help="benchmark the ops and the models (ours vs reference vs torch.compile); "
                                         "writes JSON, CSV, markdown and PNG plots")
    bench.add_argument("--quick", action="store_true",
                       help="tiny shapes and scaled-down models (about 2 minutes on a 2-core CPU)")
    bench.add_argument("--suite", choices=("ops", "models", "all"), default="all")
    bench.add_argument("--compile-matrix", action="store_true",
                       help="instead: {eager, compile default, max-autotune} x {reference, fused ops} x "
                            "{fp32, bf16} for the autoencoder and the UNet, with graph breaks")
    bench.add_argument("--out", help="output folder (default runs/bench/<date>-<card>)")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bench.add_argument("--threads", type=int, default=None,
                       help="CPU intra-op threads (default: 1 with --quick on a CPU, else torch's default)")
    bench.set_defaults(func=cmd_bench)

    prof = sub.add_parser("profile", help="torch.profiler over N training steps of an experiment: Chrome trace, "
                                          "top kernels, samples/s, peak memory, project kernels' GB/s")
    prof.add_argument("--config", required=True, help="experiment YAML (see experiments/)")
    prof.add_argument("--steps", type=int, default=5, help="profiled training steps (default 5)")
    prof.add_argument("--out", help="output folder (default runs/profile/<config name>)")
    prof.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    prof.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key, e.g. --set training.batch_size=4 (repeatable)")
    prof.add_argument("--top", type=int, default=25, help="rows of the top-ops table (default 25)")
    prof.add_argument("--threads", type=int, default=None,
                      help="CPU intra-op threads (default torch's; 1 is steadier on a busy 2-core machine)")
    prof.set_defaults(func=cmd_profile)
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
