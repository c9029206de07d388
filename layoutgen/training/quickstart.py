"""The quickstart: the whole pipeline, end to end, on generated floor plans, sized for a 2-core CPU.

    layoutgen quickstart [--out runs/quickstart] [--set diffusion.training.max_steps=100] [--resume]

Five stages, each in its own folder under OUT:

1. data/         `write_synthetic_dataset`: PNG layouts, segmentation maps, outlines and a manifest.csv
2. autoencoder/  an autoencoder experiment trained on that manifest (RGB, room-class and layout-type heads)
3. latents/      every layout pre-embedded with the trained autoencoder (`embed_manifest`)
4. diffusion/    a class-conditional latent diffusion model trained on those latents
5. OUT itself:   samples.png (one row of samples per layout type, through the decoder's RGB head),
                 samples_rooms.png (the same samples through its room-class head), samples.safetensors (their
                 latents and labels) and metrics.json: the generation metrics of the samples beside the same metrics
                 of real layouts and of the autoencoder's reconstructions of them (what decoding alone reaches)

The config (layoutgen/training/quickstart.yaml) has one section per stage: `data` (SyntheticDataConfig keys),
`autoencoder` and `diffusion` (an autoencoder / diffusion experiment without its data section, which the
quickstart fills in) and `sample`. `--set` keys follow that nesting, e.g. `autoencoder.training.epochs=2` or
`diffusion.diffusion.unet.base_channels=32`. With `--resume` each training stage continues from its latest
checkpoint and the data and embedding stages keep what is already on disk.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from layoutgen.config import Config, load_yaml, option
from layoutgen.training.experiment import SyntheticDataConfig, merge, parse_overrides

__all__ = ["QuickstartConfig", "SampleConfig", "format_results", "load_quickstart_config", "run_quickstart",
           "sample_and_evaluate"]

STAGES = 5


@dataclass
class SampleConfig(Config):
    section = "sample"

    per_class: int = option(8, min=1, doc="samples drawn for every layout type (one grid row each)")
    steps: int | None = option(None, min=1, doc="sampling steps; null = the diffusion model's sample_steps")
    sampler: str | None = option(None, choices=("ddim", "ddpm"), doc="null = the diffusion model's sampler")
    guidance: float | None = option(None, min=0.0, doc="classifier-free guidance; null = the model's")
    seed: int = option(0, min=0)
    reference: int = option(64, min=1, doc="real layouts the reference metrics are measured on")


@dataclass
class QuickstartConfig(Config):
    data: SyntheticDataConfig = option(SyntheticDataConfig)
    autoencoder: dict[str, Any] = option({}, doc="an autoencoder experiment without its data section")
    diffusion: dict[str, Any] = option({}, doc="a diffusion experiment without its data section")
    sample: SampleConfig = option(SampleConfig)

    def validate(self, where: str) -> None:
        for name in ("autoencoder", "diffusion"):
            if "data" in getattr(self, name):
                raise ValueError(f"{name}.data: the quickstart sets each stage's data itself; use the top-level "
                                 f"data section")
        self.autoencoder_experiment("data/manifest.csv")
        self.diffusion_experiment("latents/manifest.csv", "autoencoder.safetensors", [4, 16, 16])

    def _manifest_data(self, manifest: str) -> dict[str, Any]:
        # One split for both training stages: the diffusion model validates on the latents of the very layouts the
        # autoencoder validated on, and never trains on them.
        return {"manifest": manifest, "val_fraction": self.data.val_fraction, "split_seed": self.data.seed}

    def autoencoder_experiment(self, manifest: str) -> Config:
        from layoutgen.training.experiment import AutoencoderExperiment

        try:
            return AutoencoderExperiment.from_dict({**self.autoencoder, "data": self._manifest_data(manifest)})
        except ValueError as err:
            raise ValueError(f"autoencoder.{err}") from None

    def diffusion_experiment(self, manifest: str, autoencoder: str, latent_shape: list[int],
                             latent_scale: float | None = None) -> Config:
        """The diffusion stage's experiment, its latent shape, autoencoder and (unless the config sets one) latent
        scale filled in from the stages before."""
        from layoutgen.training.run import DiffusionExperiment

        section = dict(self.diffusion)
        model = dict(section.get("diffusion") or {})
        unet = dict(model.get("unet") or {})
        unet["in_channels"] = latent_shape[0]
        model.update(unet=unet, latent_size=list(latent_shape[1:]), autoencoder_checkpoint=autoencoder)
        if model.get("latent_scale") is None and latent_scale is not None:
            model["latent_scale"] = latent_scale
        data = {**self._manifest_data(manifest), "outputs": ["latent", "label"]}
        try:
            return DiffusionExperiment.from_dict({**section, "diffusion": model, "data": data})
        except ValueError as err:
            raise ValueError(f"diffusion.{err}") from None


def default_config_path() -> Any:
    return resources.files("layoutgen.training").joinpath("quickstart.yaml")


def load_quickstart_config(path: str | None = None, overrides: list[str] | None = None) -> QuickstartConfig:
    """The quickstart config (the packaged quickstart.yaml by default) with `key.path=value` overrides applied."""
    if path is None:
        with resources.as_file(default_config_path()) as packaged:
            data = load_yaml(str(packaged))
    else:
        data = load_yaml(path)
    return QuickstartConfig.from_dict(merge(data, parse_overrides(overrides or [])))


class _Stages:
    """Prints one banner per stage and its duration, so a person sees where the run is."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.number, self.start = enabled, 0, time.perf_counter()
        self._stage_start = self.start

    def begin(self, text: str) -> None:
        self.number += 1
        self._stage_start = time.perf_counter()
        if self.enabled:
            print(f"[{self.number}/{STAGES}] {text}", flush=True)

    def end(self, text: str) -> None:
        if self.enabled:
            now = time.perf_counter()
            print(f"      {text} ({now - self._stage_start:.0f} s; {now - self.start:.0f} s in all)", flush=True)


def _write_data(cfg: SyntheticDataConfig, out: str, resume: bool) -> str:
    """The generated dataset's manifest; with `resume` an existing one made from the same settings is kept."""
    from layoutgen.models.datasets.synthetic import write_synthetic_dataset
    from layoutgen.utils.atomic import atomic_write_text

    stamp_path = os.path.join(out, "settings.json")
    stamp = json.dumps({k: cfg.to_dict()[k] for k in ("num_samples", "image_size", "seed", "empty_prob")})
    manifest = os.path.join(out, "manifest.csv")
    if resume and os.path.isfile(manifest) and os.path.isfile(stamp_path):
        with open(stamp_path) as fh:
            if fh.read() == stamp:
                return manifest
    if os.path.exists(stamp_path):   # a stop while rewriting must not leave the old stamp vouching for the files
        os.remove(stamp_path)
    write_synthetic_dataset(out, num=cfg.num_samples, size=cfg.image_size, seed=cfg.seed, empty_prob=cfg.empty_prob)
    atomic_write_text(stamp_path, stamp)   # after the manifest: a stamp always describes a complete dataset
    return manifest


def _load_latents(manifest: str) -> torch.Tensor:
    """Every latent a manifest's latent_path column names, stacked [N, C, h, w]."""
    from layoutgen.models.datasets.datasets import load_latent, read_manifest

    root = os.path.dirname(os.path.abspath(manifest))
    paths = read_manifest(manifest)["latent_path"]
    return torch.stack([load_latent(p if os.path.isabs(p) else os.path.join(root, p)) for p in paths])


def _room_classes(autoencoder: Any, latents: torch.Tensor, device: str) -> torch.Tensor | None:
    """Latents -> the decoder's room-class maps [N, H, W] (argmax of its first segmentation head), or None."""
    names = [h["name"] for h in autoencoder.cfg.decoder.heads if h["type"] == "SegmentationHead"]
    if not names:
        return None
    with torch.no_grad():
        return torch.cat([autoencoder.decode(latents[i:i + 16].to(device))[names[0]].argmax(1).cpu()
                          for i in range(0, len(latents), 16)])


def _reference_images(manifest: str, cfg: QuickstartConfig, autoencoder: Any, device: str) -> dict[str, Any]:
    """Real validation layouts and the autoencoder's reconstructions of them: what the metrics reach without
    diffusion (real) and with decoding alone (reconstructed), printed beside the samples' values."""
    from layoutgen.models.datasets.datasets import ManifestDataset

    dataset = ManifestDataset(manifest, outputs=["rgb", "label"], split="val", val_fraction=cfg.data.val_fraction,
                              split_seed=cfg.data.seed)
    if len(dataset) == 0:
        dataset = ManifestDataset(manifest, outputs=["rgb", "label"])
    count = min(cfg.sample.reference, len(dataset))
    items = [dataset[i] for i in range(count)]
    real = torch.stack([item["rgb"] for item in items])
    labels = torch.stack([torch.as_tensor(item["label"]) for item in items])
    with torch.no_grad():
        latents = torch.cat([autoencoder.encode(real[i:i + 16].to(device))["latent"].float().cpu()
                             for i in range(0, count, 16)])
        reconstructed = torch.cat([autoencoder.decode(latents[i:i + 16].to(device))["rgb"].float().cpu().clamp(-1, 1)
                                   for i in range(0, count, 16)])
    return {"real": real, "reconstructed": reconstructed, "labels": labels,
            "reconstructed_classes": _room_classes(autoencoder, latents, device)}


def run_quickstart(cfg: QuickstartConfig, out: str, resume: bool = False, progress: bool = True,
                   verbose: bool = True) -> dict[str, Any]:
    """Runs the five stages into `out`; returns {"samples": metrics, "real": ..., "reconstructed": ..., ...}."""
    from layoutgen.models.datasets.embed import embed_manifest
    from layoutgen.training.autoencoder import resolve_device
    from layoutgen.training.run import run_experiment
    from layoutgen.utils.atomic import atomic_write_text

    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "config.yaml"), cfg.to_yaml())
    stages = _Stages(verbose)

    stages.begin(f"data: {cfg.data.num_samples} generated {cfg.data.image_size}x{cfg.data.image_size} layouts "
                 f"-> {os.path.join(out, 'data')}")
    manifest = _write_data(cfg.data, os.path.join(out, "data"), resume)
    stages.end(f"manifest {manifest}")

    stages.begin("autoencoder: image -> latent -> RGB, room classes and layout type")
    ae_experiment = cfg.autoencoder_experiment(manifest)
    ae_summary = run_experiment("autoencoder", ae_experiment, os.path.join(out, "autoencoder"), resume=resume,
                                progress=progress)
    ae_checkpoint = ae_summary["checkpoint"]
    stages.end(", ".join(f"{k} {ae_summary[k]:.3f}" for k in ("rgb_psnr", "segmentation_pixel_accuracy",
                                                             "classification_accuracy") if k in ae_summary))

    stages.begin("embed: every layout -> its latent")
    embedded = embed_manifest(ae_checkpoint, manifest, os.path.join(out, "latents"), batch_size=64,
                              device=ae_experiment.training.device, progress=progress)
    stages.end(f"{embedded['embedded']} embedded, {embedded['already_embedded']} kept; latent shape "
               f"{embedded['latent_shape']}")

    stages.begin("diffusion: class-conditional latent diffusion on those latents")
    training_latents = _load_latents(embedded["manifest"])
    # 1 / std over every latent rather than over the first batch (the model's own default): a steadier scale
    latent_scale = float(1.0 / training_latents.double().std().clamp_min(1e-12))
    experiment = cfg.diffusion_experiment(embedded["manifest"], ae_checkpoint, list(embedded["latent_shape"]),
                                          latent_scale)
    diff_summary = run_experiment("diffusion", experiment, os.path.join(out, "diffusion"), resume=resume,
                                  progress=progress)
    val = f"val_loss {diff_summary['val_loss']:.4f} " if "val_loss" in diff_summary else ""
    stages.end(f"{val}after {diff_summary['steps']} steps")

    stages.begin("sample and evaluate")
    results = sample_and_evaluate(cfg, diff_summary["checkpoint"], out, manifest, training_latents,
                                  str(resolve_device(experiment.training.device)))
    results.update(autoencoder={k: v for k, v in ae_summary.items() if isinstance(v, float)},
                   diffusion={k: v for k, v in diff_summary.items() if isinstance(v, float)},
                   seconds=time.perf_counter() - stages.start)
    atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(results, indent=2) + "\n")
    stages.end(f"{cfg.sample.per_class} samples per layout type -> {os.path.join(out, 'samples.png')}")
    return results


def sample_and_evaluate(cfg: QuickstartConfig, checkpoint: str, out: str, manifest: str,
                        training_latents: torch.Tensor, device: str) -> dict[str, Any]:
    """Samples `sample.per_class` layouts per class from the diffusion checkpoint into samples.png (RGB head),
    samples_rooms.png (room-class head) and samples.safetensors; returns the metrics of the samples, of real
    validation layouts and of the autoencoder's reconstructions of them."""
    from layoutgen.evaluation.generation import evaluate_generation, room_rectangularity
    from layoutgen.models.datasets.synthetic import LAYOUT_TYPES
    from layoutgen.training.images import class_rows_grid, save_png
    from layoutgen.training.run import classifier_of, generate, load_model
    from layoutgen.utils.atomic import atomic_write_bytes
    from safetensors.torch import save as save_tensors

    model = load_model(checkpoint)
    num_classes = model.cfg.unet.num_classes
    sample = cfg.sample
    latents, images, labels = generate(model, sample.per_class * max(1, num_classes), None, sample.steps,
                                       sample.sampler, sample.guidance, sample.seed, device)
    tensors = {"latents": latents.contiguous()}
    names = None
    if labels is not None:   # one row per class
        order = torch.argsort(labels, stable=True)
        latents, images, labels = latents[order], images[order], labels[order]
        tensors.update(latents=latents.contiguous(), labels=labels.contiguous())
        names = [LAYOUT_TYPES[i] if i < len(LAYOUT_TYPES) else str(i) for i in range(num_classes)]
    atomic_write_bytes(os.path.join(out, "samples.safetensors"), save_tensors(tensors))
    save_png(os.path.join(out, "samples.png"), class_rows_grid(images, sample.per_class, names))

    classifier = classifier_of(model.autoencoder) if labels is not None else None
    results = {"samples": evaluate_generation(images, labels=labels if classifier else None, classifier=classifier,
                                              generated_latents=latents, training_latents=training_latents)}
    reference = _reference_images(manifest, cfg, model.autoencoder, device)
    for name in ("real", "reconstructed"):
        results[name] = evaluate_generation(reference[name], labels=reference["labels"] if classifier else None,
                                            classifier=classifier)
    # The decoder's room-class head read directly: its maps are palette colours by construction (so no palette
    # fidelity here), but their rooms' shapes are the decoder's own, free of the RGB head's blur.
    classes = _room_classes(model.autoencoder, latents, device)
    if classes is not None:
        save_png(os.path.join(out, "samples_rooms.png"),
                 class_rows_grid(_palette_images(classes), sample.per_class, names))
        results["samples_rooms"] = {"room_rectangularity": room_rectangularity(classes)}
        results["reconstructed_rooms"] = {
            "room_rectangularity": room_rectangularity(reference["reconstructed_classes"])}
    return results


def _palette_images(classes: torch.Tensor) -> torch.Tensor:
    """Class maps [N, H, W] -> their palette colours as images [N, 3, H, W] in [-1, 1]."""
    from layoutgen.models.datasets.synthetic import PALETTE

    palette = torch.as_tensor(PALETTE, dtype=torch.float32) / 127.5 - 1.0
    return palette[classes % len(palette)].permute(0, 3, 1, 2)


# What the quickstart's samples aim to reach; printed beside the measured values.
TARGETS = {"palette_fidelity": 0.9, "room_rectangularity": 0.85}


def format_results(results: dict[str, Any]) -> str:
    """The evaluation as a small table: samples, reconstructions and real layouts side by side."""
    columns = ("samples", "reconstructed", "real")
    keys = [k for k in results["samples"] if not k.startswith("memorisation")]
    lines = [f"  {'metric':<28}" + "".join(f"{c:>15}" for c in columns) + f"{'aim':>8}"]
    for key in keys:
        row = f"  {key:<28}"
        for column in columns:
            value = results[column].get(key)
            row += f"{value:>15.3f}" if value is not None else f"{'-':>15}"
        aim = TARGETS.get(key)
        lines.append(row + (f"{'>= ' + str(aim):>8}" if aim is not None else ""))
    if "samples_rooms" in results:
        row = f"  {'room_rectangularity (classes)':<28}{results['samples_rooms']['room_rectangularity']:>15.3f}"
        row += f"{results['reconstructed_rooms']['room_rectangularity']:>15.3f}{'-':>15}"
        lines.append(row + f"{'>= ' + str(TARGETS['room_rectangularity']):>8}")
    samples = results["samples"]
    if "memorisation_ratio" in samples:
        lines.append(f"  memorisation: nearest training latent {samples['memorisation_mean_distance']:.3f} away on "
                     f"average; training latents {samples['memorisation_training_distance']:.3f} from each other "
                     f"(ratio {samples['memorisation_ratio']:.2f}: well below 1 would mean copying)")
    return "\n".join(lines)
