"""layoutgen.kernels: the fast ops the models call, each beside its pure-PyTorch reference.

Installed from the top-level folder `kernels/` as the subpackage `layoutgen.kernels` (see setup.py).
"""
from layoutgen.kernels.attention import attention, attention_ref
from layoutgen.kernels.backend import BACKENDS, get_backend, set_backend, use_backend
from layoutgen.kernels.group_norm_silu import GroupNormSiLU, group_norm_silu, group_norm_silu_ref
from layoutgen.kernels.noise_ops import (add_noise, add_noise_ref, ddim_step, ddim_step_ref, ddpm_step, ddpm_step_ref,
                                         velocity, velocity_ref)

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "GroupNormSiLU", "attention", "attention_ref", "group_norm_silu", "group_norm_silu_ref",
           "add_noise", "add_noise_ref", "velocity", "velocity_ref", "ddpm_step", "ddpm_step_ref", "ddim_step",
           "ddim_step_ref"]
