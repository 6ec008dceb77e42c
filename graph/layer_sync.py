"""After slicing a leaf module's tensors, bring the attributes that size its forward in line (one handler per type)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .registry import registers_in

SYNC: dict[type, Callable[[nn.Module, dict], None]] = {}
syncs = registers_in(SYNC)
"""Register ``sync(module, old)`` for module types; ``old`` holds the sizes before slicing."""


def snapshot(module: nn.Module) -> dict:
    """Sizes a sync handler needs to compare with after slicing."""
    return {name: getattr(module, name) for name in ("in_channels", "out_channels", "groups", "num_groups",
                                                     "num_channels") if hasattr(module, name)}


def sync_attributes(module: nn.Module, old: dict) -> None:
    """Update ``module``'s size attributes from its (sliced) tensors."""
    for cls in type(module).__mro__:
        if cls in SYNC:
            SYNC[cls](module, old)
            return


@syncs(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(module: nn.Conv2d, old: dict) -> None:
    out_channels = module.weight.shape[0]
    if old["groups"] > 1:
        module.groups = old["groups"] * out_channels // old["out_channels"]
    module.out_channels = out_channels
    module.in_channels = module.weight.shape[1] * module.groups


@syncs(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose(module: nn.ConvTranspose2d, old: dict) -> None:
    in_channels = module.weight.shape[0]
    if old["groups"] > 1:
        module.groups = old["groups"] * in_channels // old["in_channels"]
    module.in_channels = in_channels
    module.out_channels = module.weight.shape[1] * module.groups


@syncs(nn.Linear)
def _linear(module: nn.Linear, old: dict) -> None:
    module.out_features, module.in_features = module.weight.shape


@syncs(nn.modules.batchnorm._NormBase)
def _batch_norm(module, old: dict) -> None:
    tensor = module.weight if module.weight is not None else module.running_mean
    if tensor is not None:
        module.num_features = tensor.shape[0]


@syncs(nn.GroupNorm)
def _group_norm(module: nn.GroupNorm, old: dict) -> None:
    channels = module.weight.shape[0]
    module.num_groups = old["num_groups"] * channels // old["num_channels"]
    module.num_channels = channels


@syncs(nn.LayerNorm, nn.RMSNorm)
def _layer_norm(module, old: dict) -> None:
    if module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)


@syncs(nn.Embedding)
def _embedding(module: nn.Embedding, old: dict) -> None:
    module.embedding_dim = module.weight.shape[1]


@syncs(nn.PReLU)
def _prelu(module: nn.PReLU, old: dict) -> None:
    module.num_parameters = module.weight.numel()
