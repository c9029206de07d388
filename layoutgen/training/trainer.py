"""One trainer for the autoencoder, the latent diffusion model and the ControlNet.

    trainer = Trainer(model, loss_fn, train_loader, val_loader, config={"epochs": 5, "ema_decay": 0.999},
                      out_dir="runs/x")
    summary = trainer.fit()                  # Trainer(..., resume=True).fit() continues from latest.safetensors

One step function for every model kind: with a `loss_fn` the model is an autoencoder-like module trained on
`loss_fn(model(batch["rgb"]), batch) -> (loss, logs)`; without one the model supplies
`model.training_loss(batch, generator) -> (loss, logs)` (DiffusionModel, ControlNetDiffusion). The generator is
re-seeded from (seed, micro-batch number) before each call, so its draws need no saving to resume exactly.
`layoutgen.training.run.run_experiment` builds the model, loss and loaders of each experiment kind for it
(autoencoder: `build_loss(loss)` as loss_fn), so all three kinds resume and run under torchrun alike.

The optimizer (`optimizer`, see layoutgen.training.optimizers: AdamW, fused AdamW or apex FusedAdam) runs on
`model.trainable_parameters()` (frozen sub-models stay outside it). `compile` (true or a torch.compile mode)
compiles the model in place (`nn.Module.compile`), or its `training_loss` for models without a loss_fn, so
state_dict keys and checkpoints are those of the plain model. Linear warmup then cosine decay, gradient clipping,
gradient accumulation, AMP (bf16; fp16 with a GradScaler on CUDA only), EMA, non-finite loss/gradient steps skipped
and counted (`max_nonfinite` in a row stop the run with a RuntimeError), validation each epoch (mean loss, plus the
autoencoder's `evaluate` metrics) feeding the best checkpoint and early stopping, checkpoints through
`CheckpointManager` (latest, best, every N steps), metrics.csv rewritten atomically at each log step,
loss_curves.png redrawn at epoch ends (layoutgen.training.plots), previews/epoch_XXXX.png every `preview_every`
epochs from the caller's `preview_fn` (layoutgen.training.previews), optional TensorBoard logging to
out_dir/tensorboard (`tensorboard: true`), and a tqdm bar with the loss and samples/s.

Resuming is exact: the training loader is rebuilt over an `EpochSampler` whose order depends only on (seed, epoch),
and the checkpoint records how many batches of the current epoch were consumed, so a resumed run sees the same
remaining batches. With EMA on, the checkpoint's model weights are the EMA weights (what one evaluates or samples
with); the live weights travel inside the optimizer part (see `_OptimizerState`) so training continues from them.

Distributed (DDP; launch with `torchrun`, initialise with `layoutgen.training.distributed.init_from_env()` before
building the Trainer): when torch.distributed is initialised, `batch_size` is the per-rank batch, so the global
batch is `batch_size * world_size`. Every rank draws the same per-epoch permutation and reads its strided slice
`order[rank::world]` (EpochSampler with `num_replicas`/`rank`; the order is padded by wrapping around to a multiple
of the world size, as DistributedSampler does, so every rank runs the same number of steps). The model is not
wrapped in DistributedDataParallel (`model.training_loss(...)` would bypass its forward); instead the gradients of
the trainable parameters are averaged over the ranks with bucketed all_reduces after backward, before unscaling and
clipping, which gives the same update as one process over the global batch for losses that are means over samples.
Non-finite steps are skipped on all ranks together; the logged loss/metrics are the means over ranks and samples/s
is the global rate. Validation is split across the ranks by whole batches (rank r evaluates batches r, r + world,
... of the val_loader, so per-batch validation noise is that of one process) and the sums behind the loss and the
autoencoder metrics (squared errors, correct pixels, per-class intersections and unions) are all-reduced, so every
rank gets the single-process values; a sequential DataLoader is rebuilt to load only its batches, any other
val_loader is read whole on every rank (it must not be sharded already). Only rank 0 writes checkpoints, metrics.csv
and the progress bar, with a barrier after each checkpoint write; resume loads latest on every rank. A loader with a
custom sampler is kept as given (shard it yourself, e.g. with `layoutgen.models.datasets.sampling.ShardedSampler`,
which reads the rank from torch.distributed): the manifest loaders (build_torch_loader's EpochDataLoader, with
weighted sampling or not, and the DALI loader) are such loaders. Each epoch the Trainer calls the loader's
`set_epoch` (else its batch sampler's or sampler's), and a resumed run skips the batches of the interrupted epoch
already consumed by reading and dropping them, which is exact because their order depends on (seed, epoch) only.
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler
from tqdm.auto import tqdm

from layoutgen.config import option
from layoutgen.training import distributed as dist_utils
from layoutgen.training.autoencoder import (TrainingConfig, add_sums, autocast_context, head_kinds, metric_sizes,
                                            metric_sums, metrics_from_sums, resolve_device, to_device, warmup_cosine,
                                            write_history)
from layoutgen.training.checkpointing import CheckpointManager
from layoutgen.training.ema import EMA
from layoutgen.training.images import save_png
from layoutgen.training.plots import PLOT_INTERVAL_S, TensorBoardLog, plot_history, require_tensorboard
from layoutgen.training.previews import preview_image
from layoutgen.training.optimizers import build_optimizer

__all__ = ["COMPILE_MODES", "EpochSampler", "Trainer", "TrainerConfig"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainerConfig(TrainingConfig):
    """TrainingConfig plus the trainer's own options."""
    section = "training"

    grad_accumulation: int = option(1, min=1, doc="micro-batches per optimizer step")
    ema_decay: float | None = option(None, min=0.0, max=1.0, doc="EMA of the weights; null = off")
    early_stopping_patience: int | None = option(None, min=1, doc="epochs without improvement; null = off")
    early_stopping_min_delta: float = option(0.0, min=0.0, doc="smallest val-loss decrease that counts")
    checkpoint_every: int | None = option(None, min=1, doc="also checkpoint every N steps; null = each epoch only")
    keep_last: int | None = option(3, min=1, doc="step checkpoints kept (besides the best)")
    max_nonfinite: int = option(5, min=1, doc="stop after this many non-finite steps in a row")
    input_key: str = option("rgb", doc="batch key fed to model(...) when a loss_fn is given")
    optimizer: str = option("auto", choices=("auto", "adamw", "fused_adamw", "apex_fused_adam"),
                            doc="auto: apex FusedAdam on CUDA when apex imports, else fused AdamW on CUDA, AdamW on "
                                "CPU")
    compile: bool | str = option(False, doc=f"torch.compile the model: false, true or a mode {list(COMPILE_MODES)}")
    # Previews need a preview_fn (run_experiment passes one); every epoch by default because one preview is a few
    # DDIM steps on a handful of samples, cheap beside an epoch, and a person checks a run by its latest grid.
    preview_every: int | None = option(1, min=1, doc="write previews/epoch_XXXX.png every N epochs (and after the "
                                                      "last); null = never")
    tensorboard: bool = option(False, doc="also log scalars and previews to out_dir/tensorboard (pip install "
                                          "tensorboard)")

    def validate(self, where: str) -> None:
        if isinstance(self.compile, str) and self.compile not in COMPILE_MODES:
            raise ValueError(f"{where or 'training'}.compile: unknown mode {self.compile!r}; use false, true or one of "
                             f"{list(COMPILE_MODES)}")


class EpochSampler(Sampler[int]):
    """Indices 0..n-1, shuffled by a generator seeded from (seed, epoch) only; `start` items are skipped.

    With `num_replicas` > 1 it yields this rank's strided slice `order[rank::num_replicas]` of the global order
    (padded by wrapping around to a multiple of num_replicas, so every rank gets ceil(n / num_replicas) items);
    `start` then counts this rank's items.
    """

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1,
                 rank: int = 0) -> None:
        self.num_items, self.seed, self.shuffle = int(num_items), int(seed), bool(shuffle)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"EpochSampler: bad rank {rank} / num_replicas {num_replicas}")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=g).tolist()

    def rank_order(self, epoch: int) -> list[int]:
        """This rank's items of the epoch: the global order (padded) sliced [rank::num_replicas]."""
        order = self.order(epoch)
        if self.num_replicas == 1:
            return order
        total = self._per_rank() * self.num_replicas
        while order and len(order) < total:
            order = order + order[:total - len(order)]
        return order[self.rank:total:self.num_replicas]

    def _per_rank(self) -> int:
        return math.ceil(self.num_items / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_order(self.epoch)[self.start:])

    def __len__(self) -> int:
        return max(0, self._per_rank() - self.start)


def _resumable_loader(loader: Any, seed: int) -> DataLoader | None:
    """The loader rebuilt over an EpochSampler, or None when its sampler is a custom one (kept as given)."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return None
    if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        return None
    sampler = EpochSampler(len(loader.dataset), seed, shuffle=isinstance(loader.sampler, RandomSampler),
                           num_replicas=dist_utils.world_size(), rank=dist_utils.rank())
    # A private generator: creating the iterator must not draw from the global RNG (saved in checkpoints).
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn, generator=torch.Generator().manual_seed(seed))


class _OptimizerState:
    """The optimizer's state dict plus, with EMA on, the live weights (the checkpoint's model.* are the EMA ones)."""

    def __init__(self, optimizer: torch.optim.Optimizer, live: Callable[[], dict[str, torch.Tensor]] | None) -> None:
        self.optimizer, self.live = optimizer, live
        self.loaded_live: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.live is not None:
            state["live_weights"] = {k: v.detach().clone() for k, v in self.live().items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.loaded_live = dict(state["live_weights"]) if "live_weights" in state else None


class Trainer:
    """Trains `model` (see the module docstring); `fit()` returns a summary dict.

    Args:
        model: an autoencoder-like module (with `loss_fn`) or a model with `training_loss(batch, generator)`.
        loss_fn: `loss_fn(model_output, batch) -> (loss, logs)`, or None.
        train_loader, val_loader: DataLoaders yielding dict batches (val_loader may be None: no validation, no best
            checkpoint, no early stopping).
        config: a TrainerConfig or a dict of its fields.
        out_dir: where checkpoints/ and metrics.csv go.
        resume: continue from out_dir/checkpoints/latest.safetensors when it exists.
        progress: show the tqdm bar.
        preview_fn: `preview_fn(model, epoch) -> {name: images [N, 3, H, W] in [-1, 1]}` or a PIL image, drawn to
            previews/epoch_XXXX.png every `preview_every` epochs (see layoutgen.training.previews); None = no previews.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable | None, train_loader: Any, val_loader: Any = None, *,
                 config: TrainerConfig | Mapping[str, Any] | None = None, out_dir: str, resume: bool = False,
                 progress: bool = True, preview_fn: Callable[[nn.Module, int], Any] | None = None) -> None:
        self.cfg: TrainerConfig = TrainerConfig.from_dict(config or {})
        cfg = self.cfg
        if loss_fn is None and not hasattr(model, "training_loss"):
            raise ValueError("Trainer: without a loss_fn the model needs a training_loss(batch, generator) method")
        self.world_size = dist_utils.world_size()
        self.distributed = self.world_size > 1
        self.is_main = dist_utils.is_main()
        self.device = resolve_device(cfg.device)
        if self.distributed and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())   # set from LOCAL_RANK by init_from_env
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("training.amp: fp16 needs a CUDA device; use bf16 on the CPU")
        self.model = model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = loss_fn.to(self.device) if isinstance(loss_fn, nn.Module) else loss_fn
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.progress = progress and self.is_main

        self._loader = _resumable_loader(train_loader, cfg.seed)
        self._given_loader = train_loader
        self.val_loader = val_loader
        self.batches_per_epoch = len(self._loader if self._loader is not None else train_loader)
        if self.batches_per_epoch == 0:
            raise ValueError("Trainer: the training loader yields no batches")
        steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accumulation)
        self.total_steps = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        params = (list(model.trainable_parameters()) if hasattr(model, "trainable_parameters")
                  else [p for p in model.parameters() if p.requires_grad])
        self.params = params
        self.optimizer = build_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay, self.device)
        self._training_loss = self._compile() if cfg.compile else None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_cosine(cfg.warmup_steps, self.total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.ema = EMA(self.model, decay=cfg.ema_decay) if cfg.ema_decay is not None else None
        self._opt_state = _OptimizerState(self.optimizer, None)  # _save sets `live` when EMA is on
        self.checkpoints = CheckpointManager(os.path.join(self.out_dir, "checkpoints"), keep_last=cfg.keep_last,
                                             every=cfg.checkpoint_every)
        self.generator = torch.Generator(device=self.device)

        # progress counters (all saved in checkpoints)
        self.step = 0                # optimizer steps attempted (skipped ones included)
        self.epoch = 0
        self.batch_in_epoch = 0      # batches of the current epoch already consumed
        self.micro_step = 0          # micro-batches consumed in all
        self.skipped = 0
        self.nonfinite_in_a_row = 0
        self.optimizer_steps = 0
        self.best_val: float | None = None
        self.bad_epochs = 0
        self.stopped_early = False
        self.history: list[dict[str, Any]] = []
        self.last_val: dict[str, float] = {}
        self.resumed_from: int | None = None
        if resume:
            self._resume()
        if self.distributed:   # every rank must continue from the same step (a shared out_dir)
            steps = torch.tensor([self.step, -self.step], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
            if steps[0].item() != -steps[1].item():
                raise RuntimeError(f"Trainer: the ranks start from different steps ({-steps[1].item():.0f} to "
                                   f"{steps[0].item():.0f}); every rank needs the same out_dir to resume from")
        self.preview_fn = preview_fn
        self._plotted_at = time.monotonic()
        self._tensorboard: TensorBoardLog | None = None
        self._tensorboard_rows = len(self.history)   # resumed rows are in the earlier event files already
        if cfg.tensorboard:   # every rank checks the install, so a missing package stops them all alike
            require_tensorboard()
            if self.is_main:
                self._open_tensorboard()
        dist_utils.barrier()   # no rank starts writing while another still reads latest / cleans temp files

    # ------------------------------------------------------------------ state
    def _extra(self) -> dict[str, Any]:
        return {"batch_in_epoch": self.batch_in_epoch, "micro_step": self.micro_step, "skipped": self.skipped,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "optimizer_steps": self.optimizer_steps,
                "best_val": self.best_val, "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early}

    def _save(self, metric: float | None = None, force: bool = False) -> bool:
        """Rank 0 writes (see CheckpointManager.save); with several ranks all wait for it when a write may happen."""
        if not self.distributed:
            return self._save_local(metric, force)
        may_write = force or self.checkpoints.should_save(self.step)
        saved = self._save_local(metric, force) if self.is_main and may_write else False
        if may_write:
            dist_utils.barrier()
        return saved

    def _save_local(self, metric: float | None = None, force: bool = False) -> bool:
        kwargs = dict(model=self.model, optimizer=self._opt_state, lr_scheduler=self.scheduler,
                      scaler=self.scaler, ema=self.ema, epoch=self.epoch, extra=self._extra(), metric=metric,
                      force=force)
        if self.ema is None:
            return self.checkpoints.save(self.step, **kwargs)
        live = {k: v.detach().clone() for k, v in self.ema._live(self.model).items()}  # before the swap
        self._opt_state.live = lambda: live
        with self.ema.average_parameters(self.model):   # the saved model weights are the EMA weights
            return self.checkpoints.save(self.step, **kwargs)

    def _resume(self) -> None:
        info = self.checkpoints.resume(model=self.model, optimizer=self._opt_state, lr_scheduler=self.scheduler,
                                       scaler=self.scaler, ema=self.ema)
        if info is None:
            return
        if self.ema is not None:
            if self._opt_state.loaded_live is None:
                raise ValueError(f"{self.checkpoints.latest()}: saved without EMA; resume with ema_decay=null")
            with torch.no_grad():
                for name, tensor in self.ema._live(self.model).items():
                    tensor.copy_(self._opt_state.loaded_live[name])
        extra = info["extra"] or {}
        self.step, self.epoch = info["step"], info["epoch"]
        for key in ("batch_in_epoch", "micro_step", "skipped", "nonfinite_in_a_row", "optimizer_steps",
                    "best_val", "bad_epochs", "stopped_early"):
            if key in extra:
                setattr(self, key, extra[key])
        self.resumed_from = self.step
        path = os.path.join(self.out_dir, "metrics.csv")
        if os.path.isfile(path):
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            self.history = [{k: v for k, v in r.items() if v not in ("", None)} for r in rows
                            if int(float(r.get("step") or 0)) <= self.step]

    # ------------------------------------------------------------------ data
    def _epoch_batches(self, epoch: int, start: int) -> Iterator[Mapping[str, Any]]:
        if self._loader is not None:
            self._loader.sampler.set_epoch(epoch, start * self._loader.batch_size)
            return iter(self._loader)
        # The epoch's order: the loader's own set_epoch (EpochDataLoader, DaliLoader: their batch sampler, since a
        # DataLoader built on a batch_sampler reports a default SequentialSampler as .sampler), else the sampler's.
        loader = self._given_loader
        for owner in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
            if callable(getattr(owner, "set_epoch", None)):
                owner.set_epoch(epoch)
                break
        # resuming mid-epoch reads and drops the batches already consumed (the order depends on the epoch only)
        return itertools.islice(iter(loader), start, None)

    # ------------------------------------------------------------------ one step
    def compute_loss(self, batch: Mapping[str, Any], seed: int | None = None) -> tuple[torch.Tensor, dict]:
        """The loss of one (device) batch: loss_fn(model(batch[input_key]), batch) or model.training_loss."""
        if self.loss_fn is not None:
            with autocast_context(self.cfg.amp, self.device):
                out = self.model(batch[self.cfg.input_key])
            return self.loss_fn(out, batch)
        if seed is None:   # training draws: a distinct stream per (micro-batch, rank); == micro_step on one rank
            seed = self.micro_step * self.world_size + dist_utils.rank()
        self.generator.manual_seed(self.cfg.seed * 1_000_003 + seed)
        with autocast_context(self.cfg.amp, self.device):
            return (self._training_loss or self.model.training_loss)(batch, self.generator)

    def _compile(self) -> Callable | None:
        """torch.compile for `training.compile`; returns the compiled training_loss (None when forward is compiled).

        The module is compiled in place (`nn.Module.compile`), not wrapped in an OptimizedModule, so state_dict keys
        and checkpoints stay free of `_orig_mod.` prefixes. Models trained through `training_loss` never call their
        own forward, so that method is compiled instead (the model object, and so its state_dict, is unchanged).
        """
        kwargs = {} if self.cfg.compile is True else {"mode": self.cfg.compile}
        if self.loss_fn is not None:
            self.model.compile(**kwargs)
            return None
        return torch.compile(self.model.training_loss, **kwargs)

    def _train_step(self, batches: list[Mapping[str, Any]]) -> tuple[float | None, dict[str, float], int]:
        """One optimizer step over `batches` (accumulated); returns (loss or None when skipped, logs, samples)."""
        self.optimizer.zero_grad(set_to_none=True)
        finite, total, samples, logs = True, 0.0, 0, {}
        for batch in batches:
            batch = to_device(batch, self.device, self.cfg.channels_last)
            loss, step_logs = self.compute_loss(batch)
            self.micro_step += 1
            samples += _batch_size(batch)
            if not finite or not torch.isfinite(loss.detach()):
                finite = False          # the whole step is skipped; its other micro-batches are still consumed
                continue
            self.scaler.scale(loss / len(batches)).backward()
            total += float(loss.detach()) / len(batches)
            for k, v in step_logs.items():
                logs[k] = logs.get(k, 0.0) + float(v) / len(batches)
        if self.distributed:
            # every rank skips together, and the grads are averaged over the global batch before clipping
            counts = torch.tensor([float(finite), float(samples)], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(counts)
            finite_ranks, samples = counts.tolist()
            finite, samples = finite_ranks == self.world_size, int(samples)
            if finite:
                dist_utils.all_reduce_gradients(self.params)
                total, logs = self._mean_over_ranks(total, logs)
        if finite:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or math.inf)
            finite = self.scaler.is_enabled() or bool(torch.isfinite(grad_norm))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)   # (fp16: the GradScaler skips non-finite grads itself)
            return None, {}, samples
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.optimizer_steps += 1
        return total, logs, samples

    def _mean_over_ranks(self, total: float, logs: dict[str, float]) -> tuple[float, dict[str, float]]:
        keys = sorted(logs)
        values = dist_utils.all_reduce_mean(torch.tensor([total] + [logs[k] for k in keys], dtype=torch.float64,
                                                          device=self.device)).tolist()
        return values[0], dict(zip(keys, values[1:]))

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, loader: Any = None) -> dict[str, float]:
        """Mean validation loss (and the autoencoder's evaluate metrics), with the EMA weights when EMA is on.

        `loader` replaces val_loader for this call. Collective under DDP: every rank must call it.
        """
        loader = self.val_loader if loader is None else loader
        if loader is None:
            return {}
        if self.ema is not None:
            with self.ema.average_parameters(self.model):
                return self._validate(loader)
        return self._validate(loader)

    def _validate(self, loader: Any) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        heads = head_kinds(self.model) if self.loss_fn is not None else None
        loss_sums = torch.zeros(2, dtype=torch.float64)        # [loss * samples, samples]
        metric_totals: dict[str, torch.Tensor] = {}
        for i, batch in _rank_batches(loader, self.world_size, dist_utils.rank()):
            batch = to_device(batch, self.device, self.cfg.channels_last)
            if heads is not None:   # one forward for the loss and the metrics
                with autocast_context(self.cfg.amp, self.device):
                    out = self.model(batch[self.cfg.input_key])
                loss, _ = self.loss_fn(out, batch)
                add_sums(metric_totals, {k: v.cpu() for k, v in
                                         metric_sums(heads, {k: v.float() for k, v in out.items()}, batch).items()})
            else:   # fixed val noise per (global) batch number, independent of training and of the rank count
                loss, _ = self.compute_loss(batch, seed=-(i + 1))
            n = _batch_size(batch)
            loss_sums += torch.tensor([float(loss) * n, n], dtype=torch.float64)
        if self.distributed:
            # Sums, not per-rank means, so the result is that of one process over the whole loader. Every head has
            # its slot (zeros on a rank without batches); heads whose target the data lacks stay at zero samples.
            sizes = metric_sizes(self.model) if heads is not None else {}
            flat = torch.cat([loss_sums] + [metric_totals.get(n, torch.zeros(k, dtype=torch.float64))
                                            for n, k in sizes.items()]).to(self.device)
            torch.distributed.all_reduce(flat)
            flat = flat.cpu()
            loss_sums = flat[:2]
            parts = torch.split(flat[2:], list(sizes.values())) if sizes else ()
            metric_totals = {n: v for n, v in zip(sizes, parts) if v[1] > 0}
        results = {"val_loss": (loss_sums[0] / loss_sums[1].clamp_min(1)).item()}
        if heads is not None:
            results.update({f"val_{k}": v for k, v in metrics_from_sums(heads, metric_totals).items()})
        self.model.train(was_training)
        return results

    # ------------------------------------------------------------------ loop
    def fit(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Trains to the end (epochs / max_steps / early stopping); returns the summary.

        `stop_at_step` ends the run after that step with a checkpoint, as an interruption would (the LR schedule
        still spans the whole run); `Trainer(..., resume=True).fit()` then continues it.
        """
        cfg = self.cfg
        start = time.perf_counter()
        samples = 0
        bar = tqdm(total=self.total_steps, initial=self.step, desc=type(self.model).__name__,
                   disable=not self.progress, dynamic_ncols=True)
        self.model.train()
        interrupted = False
        try:
            while self.step < self.total_steps and not self.stopped_early and not interrupted:
                batches = self._epoch_batches(self.epoch, self.batch_in_epoch)
                while self.batch_in_epoch < self.batches_per_epoch and self.step < self.total_steps:
                    group = min(cfg.grad_accumulation, self.batches_per_epoch - self.batch_in_epoch)
                    micro = [next(batches) for _ in range(group)]
                    self.batch_in_epoch += group
                    loss, logs, n = self._train_step(micro)
                    self.step += 1
                    samples += n
                    bar.update(1)
                    if loss is None:
                        self.skipped += 1
                        self.nonfinite_in_a_row += 1
                        if self.nonfinite_in_a_row >= cfg.max_nonfinite:
                            self._write_metrics()
                            raise RuntimeError(
                                f"Trainer: {self.nonfinite_in_a_row} non-finite steps in a row (max_nonfinite="
                                f"{cfg.max_nonfinite}) at step {self.step}; the loss or the gradients are NaN/inf. "
                                f"Lower the learning rate, check the data, or use bf16 instead of fp16.")
                    else:
                        self.nonfinite_in_a_row = 0
                        sps = samples / max(1e-9, time.perf_counter() - start)
                        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                            self.history.append({"step": self.step, "epoch": self.epoch, "loss": loss,
                                                 "lr": self.scheduler.get_last_lr()[0], "samples_per_s": sps,
                                                 **logs})
                            self._write_metrics()
                        bar.set_postfix(loss=f"{loss:.4f}", sps=f"{sps:.1f}")
                        if cfg.checkpoint_every is not None:
                            self._save()
                    if stop_at_step is not None and self.step >= stop_at_step:
                        interrupted = True
                        break
                if interrupted:
                    break
                if self.batch_in_epoch >= self.batches_per_epoch:
                    self._end_epoch()
            if interrupted or self.batch_in_epoch > 0:
                # Stopped mid-epoch (stop_at_step or max_steps): leave a checkpoint to resume from.
                self._save(force=True)
            self._write_metrics(plots=True, force_plots=True)
        finally:
            bar.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
                self._tensorboard = None   # a later fit() opens a new event file in the same folder
        return {"steps": self.step, "optimizer_steps": self.optimizer_steps, "skipped_steps": self.skipped,
                "epochs": self.epoch, "best_val_loss": self.best_val, "stopped_early": self.stopped_early,
                "interrupted": interrupted, "resumed_from": self.resumed_from, **self.last_val,
                "seconds": time.perf_counter() - start, "latest": self.checkpoints.latest(),
                "best": self.checkpoints.best()}

    def _end_epoch(self) -> None:
        cfg = self.cfg
        val = self.validate()
        self.last_val = val
        metric = val.get("val_loss")
        if metric is not None and math.isfinite(metric):
            if self.best_val is None or metric < self.best_val - cfg.early_stopping_min_delta:
                self.best_val, self.bad_epochs = metric, 0
            else:
                self.bad_epochs += 1
                if cfg.early_stopping_patience is not None and self.bad_epochs >= cfg.early_stopping_patience:
                    self.stopped_early = True
        if val:
            self.history.append({"step": self.step, "epoch": self.epoch, **val})
        finished = self.epoch
        self.epoch += 1
        self.batch_in_epoch = 0
        self._save(metric=metric if metric is not None and math.isfinite(metric) else None, force=True)
        self._write_metrics(plots=True)
        # after the checkpoint, so a failing preview_fn cannot cost the epoch's weights
        last = self.epoch >= cfg.epochs or self.step >= self.total_steps or self.stopped_early
        if cfg.preview_every is not None and ((finished + 1) % cfg.preview_every == 0 or last):
            self._write_preview(finished)

    def _write_metrics(self, plots: bool = False, force_plots: bool = False) -> None:
        """metrics.csv and the new rows to TensorBoard; with `plots` (epoch ends) also loss_curves.png, at most every
        PLOT_INTERVAL_S seconds (a figure costs up to a second: short epochs would spend more time drawing than
        training), and always with `force_plots` (the end of fit)."""
        if self.history and self.is_main:
            write_history(os.path.join(self.out_dir, "metrics.csv"), self.history)
            if force_plots or (plots and time.monotonic() - self._plotted_at >= PLOT_INTERVAL_S):
                plot_history(self.history, os.path.join(self.out_dir, "loss_curves.png"))
                self._plotted_at = time.monotonic()
            if self.cfg.tensorboard:
                board = self._open_tensorboard()
                board.log_rows(self.history[self._tensorboard_rows:])
                self._tensorboard_rows = len(self.history)
                board.flush()

    def _open_tensorboard(self) -> TensorBoardLog:
        if self._tensorboard is None:
            self._tensorboard = TensorBoardLog(os.path.join(self.out_dir, "tensorboard"),
                                               purge_step=self.step if self.resumed_from is not None else None)
        return self._tensorboard

    def _write_preview(self, epoch: int) -> None:
        """previews/epoch_XXXX.png (and TensorBoard's "preview") from preview_fn; rank 0 only, EMA weights when on.

        The global RNG is forked so that drawing a preview never changes the training that follows.
        """
        if self.preview_fn is None or not self.is_main:
            return
        was_training = self.model.training
        self.model.eval()
        cuda = ([torch.cuda.current_device() if self.device.index is None else self.device.index]
                if self.device.type == "cuda" else [])
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=cuda), (
                    self.ema.average_parameters(self.model) if self.ema is not None else contextlib.nullcontext()):
                image = preview_image(self.preview_fn(self.model, epoch))
        finally:
            self.model.train(was_training)
        save_png(os.path.join(self.out_dir, "previews", f"epoch_{epoch:04d}.png"), image)
        if self.cfg.tensorboard:
            board = self._open_tensorboard()
            board.log_image("preview", image, self.step)
            board.flush()


def _rank_batches(loader: Any, world: int, rank: int) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(global batch number, batch) of this rank's share of a validation loader: batches rank, rank + world, ...

    Whole batches, as one process would form them, so per-batch validation noise (seeded by the batch number) and
    the summed results match one process exactly. A DataLoader in sequential order is rebuilt to load only this
    rank's batches; any other loader is read whole and the other ranks' batches are dropped unevaluated.
    """
    if world == 1:
        yield from enumerate(loader)
        return
    if isinstance(loader, DataLoader) and loader.batch_size is not None and \
            isinstance(loader.sampler, SequentialSampler):
        n, size = len(loader.dataset), loader.batch_size
        batches = [list(range(start, min(start + size, n))) for start in range(0, n, size)]
        if loader.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        mine = batches[rank::world]
        shard = DataLoader(loader.dataset, batch_sampler=mine, num_workers=loader.num_workers if mine else 0,
                           collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                           worker_init_fn=loader.worker_init_fn)
        for k, batch in enumerate(shard):
            yield rank + k * world, batch
        return
    for i, batch in enumerate(loader):
        if i % world == rank:
            yield i, batch


def _batch_size(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0
