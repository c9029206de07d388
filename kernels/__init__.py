"""layoutgen.kernels: the fast ops the models call, each beside its pure-PyTorch reference.

Installed from the top-level folder `kernels/` as the subpackage `layoutgen.kernels` (see setup.py).
"""
import warnings as _warnings

from layoutgen.kernels.attention import (attention, attention_ref, get_attention_backend, set_attention_backend,
                                         use_attention_backend)
from layoutgen.kernels.backend import BACKENDS, get_backend, set_backend, use_backend
from layoutgen.kernels.fuse import fuse_group_norm_silu
from layoutgen.kernels.group_norm_silu import GroupNormSiLU, group_norm_silu, group_norm_silu_ref

# `python -m layoutgen.kernels.noise_ops` (its status report) runs a module this package has already imported;
# runpy's warning about that is expected there and says nothing useful.
_warnings.filterwarnings("ignore", message=r"'layoutgen\.kernels\.noise_ops' found in sys\.modules",
                         category=RuntimeWarning)

from layoutgen.kernels.noise_ops import (add_noise, add_noise_philox, add_noise_philox_ref,  # noqa: E402
                                         add_noise_ref, ddim_step, ddim_step_ref, ddpm_step, ddpm_step_ref,
                                         noise_ops_status, velocity, velocity_ref)

__all__ = [
    # backend selection
    "BACKENDS", "get_backend", "set_backend", "use_backend",
    "get_attention_backend", "set_attention_backend", "use_attention_backend",
    # GroupNorm + SiLU
    "GroupNormSiLU", "group_norm_silu", "group_norm_silu_ref", "fuse_group_norm_silu",
    # attention
    "attention", "attention_ref",
    # noise ops
    "add_noise", "add_noise_ref", "add_noise_philox", "add_noise_philox_ref", "velocity", "velocity_ref",
    "ddpm_step", "ddpm_step_ref", "ddim_step", "ddim_step_ref", "noise_ops_status",
]
