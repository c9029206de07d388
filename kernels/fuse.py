"""`fuse_group_norm_silu(model)`: puts the fused GroupNorm+SiLU op into a user's model, in place.

Inside every nn.Sequential (at any depth), an nn.GroupNorm (or a GroupNormSiLU without activation) directly followed
by an nn.SiLU becomes one GroupNormSiLU, and the SiLU an nn.Identity, so indices and state_dict keys do not move. The
new module takes over the GroupNorm's own Parameter objects (an optimizer built before the swap still updates them)
and its eps, affine and training mode. With `plain_group_norm=True`, every other nn.GroupNorm becomes a GroupNormSiLU
with activation=None (the same op without SiLU), for models that call F.silu functionally after their norms.

The project's own blocks already use GroupNormSiLU, so on them this finds nothing to do.
"""
from __future__ import annotations

from torch import nn

from layoutgen.kernels.group_norm_silu import GroupNormSiLU


def _from_group_norm(norm: nn.GroupNorm | GroupNormSiLU, activation: str | None) -> GroupNormSiLU:
    fused = GroupNormSiLU(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine,
                          activation=activation)
    if norm.affine:
        # The same Parameter objects, not copies (device, dtype and optimizer state stay as they were).
        fused.weight = norm.weight
        fused.bias = norm.bias
    fused.train(norm.training)
    return fused


def _is_plain_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.GroupNorm) or (isinstance(m, GroupNormSiLU) and m.activation is None)


def fuse_group_norm_silu(module: nn.Module, plain_group_norm: bool = False) -> nn.Module:
    """Swaps GroupNorm -> SiLU pairs of nn.Sequential containers for GroupNormSiLU, in place; returns the module.

    A bare nn.GroupNorm passed as `module` (with plain_group_norm=True) is returned as a new GroupNormSiLU.
    """
    if plain_group_norm and isinstance(module, nn.GroupNorm):
        return _from_group_norm(module, None)
    for child in list(module.children()):
        fuse_group_norm_silu(child, plain_group_norm)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for i, name in enumerate(names[:-1]):
            first, second = module._modules[name], module._modules[names[i + 1]]
            if _is_plain_norm(first) and isinstance(second, nn.SiLU):
                module._modules[name] = _from_group_norm(first, "silu")
                module._modules[names[i + 1]] = nn.Identity()
    if plain_group_norm:
        for name, child in list(module._modules.items()):
            if isinstance(child, nn.GroupNorm):
                module._modules[name] = _from_group_norm(child, None)
    return module
