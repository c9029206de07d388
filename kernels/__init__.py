"""layoutgen.kernels: the fast ops the models call, each beside its pure-PyTorch reference.

Installed from the top-level folder `kernels/` as the subpackage `layoutgen.kernels` (see setup.py).
"""
from layoutgen.kernels.attention import attention, attention_ref
from layoutgen.kernels.group_norm_silu import GroupNormSiLU, group_norm_silu, group_norm_silu_ref

__all__ = ["GroupNormSiLU", "attention", "attention_ref", "group_norm_silu", "group_norm_silu_ref"]
