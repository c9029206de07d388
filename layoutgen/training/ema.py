"""Exponential moving average (EMA) of a model's weights.

`EMA(model)` keeps a float32 shadow copy of the model's floating-point parameters and buffers (on the model's
device) and, after each optimizer step, moves it towards the live weights:

    shadow = decay_t * shadow + (1 - decay_t) * weight          (computed as shadow.lerp_(weight, 1 - decay_t))

With `warmup=True`, decay_t = min(decay, (1 + t) / (10 + t)), where t is the number of averaging updates already
applied (0 for the first), as in the common EMA implementations: early on the average follows the weights closely
instead of remembering the random initialisation. Integer buffers (e.g. BatchNorm's num_batches_tracked) are copied,
and so is a floating-point buffer whose shadow is not finite once the live one is (a lazily set buffer).

Parameters with requires_grad=False (a frozen sub-model such as the autoencoder inside a diffusion model) are left
out by default, and so are the buffers of modules whose parameters are all frozen: `copy_to` never touches them.

    ema = EMA(model, decay=0.999)
    for batch in data:
        ...; optimizer.step(); ema.update(model)
    with ema.average_parameters(model):   # evaluate or sample with the EMA weights
        evaluate(model)
    # the live weights are back, bit for bit
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of `model`'s floating-point parameters and buffers, kept in float32.

    Args:
        model: the model whose weights are averaged (the shadow starts as a copy of them).
        decay: the target decay (e.g. 0.999 or 0.9999).
        warmup: use decay_t = min(decay, (1 + t) / (10 + t)); else decay_t = decay from the first update.
        update_after_step: for the first `update_after_step` calls to `update`, the shadow is set to a copy of the
            weights instead of averaged.
        update_every: after that, average on every `update_every`-th call only (the other calls only count steps).
        include_frozen: also average parameters with requires_grad=False (and their modules' buffers).
        include_buffers: average floating-point buffers and copy integer ones (True by default).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, update_after_step: int = 0,
                 update_every: int = 1, include_frozen: bool = False, include_buffers: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA update_every must be >= 1, got {update_every}")
        if update_after_step < 0:
            raise ValueError(f"EMA update_after_step must be >= 0, got {update_after_step}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.update_after_step = int(update_after_step)
        self.update_every = int(update_every)
        self.include_frozen = bool(include_frozen)
        self.include_buffers = bool(include_buffers)
        self.step = 0          # calls to update()
        self.num_updates = 0   # averaging updates applied (t in the warmup formula)

        self._float_names: list[str] = []
        self._int_names: list[str] = []
        buffers = {name for name, _ in model.named_buffers()}
        self._float_buffer_names: list[str] = []
        self.shadow: dict[str, torch.Tensor] = {}
        for name, tensor in self._tracked(model).items():
            if tensor.is_floating_point():
                self._float_names.append(name)
                if name in buffers:
                    self._float_buffer_names.append(name)
                self.shadow[name] = tensor.detach().to(dtype=torch.float32, copy=True)
            else:
                self._int_names.append(name)
                self.shadow[name] = tensor.detach().clone()
        self._stored: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------ selection
    def _tracked(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """name -> live tensor of everything the EMA covers, in a fixed order."""
        out: dict[str, torch.Tensor] = {}
        for name, param in model.named_parameters():
            if param.requires_grad or self.include_frozen:
                if param.is_floating_point():
                    out[name] = param
        if self.include_buffers:
            frozen_modules = set()
            if not self.include_frozen:
                for mod_name, module in model.named_modules():
                    params = list(module.parameters())
                    if params and not any(p.requires_grad for p in params):
                        frozen_modules.add(mod_name)
            for name, buf in model.named_buffers():
                owner = name.rsplit(".", 1)[0] if "." in name else ""
                if any(owner == m or owner.startswith(m + ".") or m == "" for m in frozen_modules):
                    continue
                out[name] = buf
        return out

    def _live(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's tensors for the shadow's names; a clear error if the model does not match."""
        tensors = dict(model.named_parameters())
        tensors.update(dict(model.named_buffers()))
        missing = [n for n in self.shadow if n not in tensors]
        if missing:
            raise ValueError(f"EMA: the model has no tensor named {missing[0]!r}"
                             + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
                             + "; is this the model the EMA was built for?")
        live = {n: tensors[n] for n in self.shadow}
        for name, tensor in live.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA: shape mismatch for {name!r}: EMA {tuple(self.shadow[name].shape)} vs model "
                                 f"{tuple(tensor.shape)}")
        return live

    # --------------------------------------------------------------- update
    def get_decay(self, t: int | None = None) -> float:
        """decay_t for the averaging update number `t` (default: the next one)."""
        t = self.num_updates if t is None else t
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Call once after every optimizer step."""
        self.step += 1
        live = self._live(model)
        if self.step <= self.update_after_step:
            for name, tensor in live.items():
                self.shadow[name].copy_(tensor.detach())
            return
        if (self.step - self.update_after_step) % self.update_every != 0:
            return
        for name in self._float_buffer_names:
            # A buffer set lazily (NaN until then, e.g. the diffusion model's latent_scale measured from the first
            # batch) is copied once it is set: averaging from NaN would keep the shadow NaN forever.
            shadow, tensor = self.shadow[name], live[name].detach()
            if not bool(torch.isfinite(shadow).all()) and bool(torch.isfinite(tensor).all()):
                shadow.copy_(tensor)
        weight = 1.0 - self.get_decay()
        shadows = [self.shadow[n] for n in self._float_names]
        sources = [live[n].detach().to(device=self.shadow[n].device, dtype=torch.float32)
                   for n in self._float_names]
        if shadows:
            torch._foreach_lerp_(shadows, sources, weight)
        for name in self._int_names:
            self.shadow[name].copy_(live[name].detach())
        self.num_updates += 1

    # ------------------------------------------------------------- swapping
    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Writes the EMA weights into `model` (cast to each tensor's dtype)."""
        for name, tensor in self._live(model).items():
            tensor.copy_(self.shadow[name])

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keeps an exact copy of the model's current weights for `restore`."""
        self._stored = {name: tensor.detach().clone() for name, tensor in self._live(model).items()}

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Puts back, bit for bit, the weights saved by `store`."""
        if self._stored is None:
            raise RuntimeError("EMA.restore: nothing stored; call store(model) first")
        for name, tensor in self._live(model).items():
            tensor.copy_(self._stored[name])
        self._stored = None

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Swaps the EMA weights into `model` for the block, and the live weights back afterwards (also on error)."""
        self.store(model)
        try:
            self.copy_to(model)
            yield model
        finally:
            self.restore(model)

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "shadow": {name: t.detach().clone() for name, t in self.shadow.items()},
            "step": self.step,
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup": self.warmup,
            "update_after_step": self.update_after_step,
            "update_every": self.update_every,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Loads `state_dict()` output; a missing, unexpected or mis-shaped tensor raises ValueError naming it."""
        if "shadow" not in state or not isinstance(state["shadow"], Mapping):
            raise ValueError("EMA state: no 'shadow' tensors")
        shadow = state["shadow"]
        missing = sorted(set(self.shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.shadow))
        problems = [f"missing key {k!r}" for k in missing] + [f"unexpected key {k!r}" for k in unexpected]
        problems += [f"shape mismatch for {k!r}: state {tuple(shadow[k].shape)} vs EMA {tuple(self.shadow[k].shape)}"
                     for k in self.shadow if k in shadow and tuple(shadow[k].shape) != tuple(self.shadow[k].shape)]
        if problems:
            shown = "; ".join(problems[:10]) + (f"; ... and {len(problems) - 10} more" if len(problems) > 10 else "")
            raise ValueError(f"EMA state does not match the model: {shown}")
        for name, tensor in self.shadow.items():
            tensor.copy_(shadow[name])
        self.step = int(state.get("step", 0))
        self.num_updates = int(state.get("num_updates", 0))
        self.decay = float(state.get("decay", self.decay))
        self.warmup = bool(state.get("warmup", self.warmup))
        self.update_after_step = int(state.get("update_after_step", self.update_after_step))
        self.update_every = int(state.get("update_every", self.update_every))

    def __repr__(self) -> str:
        return (f"EMA(decay={self.decay}, warmup={self.warmup}, step={self.step}, tensors={len(self.shadow)}, "
                f"update_after_step={self.update_after_step}, update_every={self.update_every})")
