"""After slicing a leaf module's tensors, bring the attributes that size its forward in line (one handler per type)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import registers_in

SYNC: dict[type, Callable[[nn.Module, dict], None]] = {}
syncs = registers_in(SYNC)
"""Register ``sync(module, old)`` for module types; ``old`` holds the sizes before slicing."""


def snapshot(module: nn.Module) -> dict:
    """Sizes a sync handler needs to compare with after slicing."""
    return {name: getattr(module, name) for name in ("in_channels", "out_channels", "groups", "num_groups",
                                                     "num_channels", "head_dim") if hasattr(module, name)}


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


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose inner width (``num_heads * head_dim``) and output width (``out_proj``) may
    differ from ``embed_dim`` (the query width), as after pruning heads or channels. Same arguments and outputs."""

    @classmethod
    def from_sizes(cls, embed_dim: int, kdim: int, vdim: int, num_heads: int, head_dim: int, out_features: int,
                   qkv_same_embed_dim: bool, bias: bool, batch_first: bool,
                   dropout: float) -> "PrunedMultiheadAttention":
        """An uninitialised module of these widths, its tensors on the ``meta`` device (the savers rebuild one from
        :meth:`sizes` and then assign the stored tensors)."""
        width = num_heads * head_dim
        with torch.device("meta"):
            module = nn.MultiheadAttention(width, num_heads, dropout, bias, batch_first=batch_first)
            if qkv_same_embed_dim:
                module.in_proj_weight = nn.Parameter(torch.empty(3 * width, embed_dim))
            else:
                del module.in_proj_weight
                module.register_parameter("in_proj_weight", None)
                module.q_proj_weight = nn.Parameter(torch.empty(width, embed_dim))
                module.k_proj_weight = nn.Parameter(torch.empty(width, kdim))
                module.v_proj_weight = nn.Parameter(torch.empty(width, vdim))
            module.out_proj = type(module.out_proj)(width, out_features, bias=bias)
        module.embed_dim, module.kdim, module.vdim = embed_dim, kdim, vdim
        module._qkv_same_embed_dim = qkv_same_embed_dim
        module.__class__ = cls
        return module

    def sizes(self) -> dict:
        """The widths and flags that :meth:`from_sizes` rebuilds this module from."""
        return {"embed_dim": self.embed_dim, "kdim": self.kdim, "vdim": self.vdim, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "out_features": self.out_proj.out_features,
                "qkv_same_embed_dim": bool(self._qkv_same_embed_dim), "bias": self.in_proj_bias is not None,
                "batch_first": bool(self.batch_first), "dropout": float(self.dropout)}

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        heads, head_dim = self.num_heads, self.head_dim
        width = heads * head_dim
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.split(width)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.split(width) if self.in_proj_bias is not None else (None, None, None)
        length, batch, source = query.shape[0], query.shape[1], key.shape[0]
        q, k, v = (F.linear(x, w, b).reshape(x.shape[0], batch * heads, head_dim).transpose(0, 1)
                   for x, w, b in zip((query, key, value), weights, biases))
        scores = torch.bmm(q * head_dim ** -0.5, k.transpose(1, 2))
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            scores = _apply_mask(scores, attn_mask.reshape(-1, length, source))
        if key_padding_mask is not None:
            mask = key_padding_mask.reshape(batch, 1, 1, source).expand(batch, heads, 1, source)
            scores = _apply_mask(scores, mask.reshape(batch * heads, 1, source))
        attention = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = torch.bmm(attention, v).transpose(0, 1).reshape(length, batch, width)
        out = self.out_proj(out)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        attention = attention.reshape(batch, heads, length, source)
        return out, attention.mean(1) if average_attn_weights else attention


def _apply_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask


@syncs(nn.MultiheadAttention)
def _multihead_attention(module: nn.MultiheadAttention, old: dict) -> None:
    """Widths from the sliced projections; the module becomes :class:`PrunedMultiheadAttention`."""
    if module._qkv_same_embed_dim:
        rows, module.embed_dim = module.in_proj_weight.shape[0] // 3, module.in_proj_weight.shape[1]
        module.kdim = module.vdim = module.embed_dim
    else:
        rows, module.embed_dim = module.q_proj_weight.shape
        module.kdim, module.vdim = module.k_proj_weight.shape[1], module.v_proj_weight.shape[1]
    module.num_heads = rows // old["head_dim"]
    module.out_proj.out_features, module.out_proj.in_features = module.out_proj.weight.shape
    module.__class__ = PrunedMultiheadAttention
