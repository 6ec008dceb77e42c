"""Channel rules for parameter-holding layers, parameters and inputs."""
from __future__ import annotations

import numpy as np

from .context import RuleContext
from .labels import Factor, Labeling
from .registry import channel_rule


@channel_rule("input")
def input_rule(ctx: RuleContext) -> None:
    """Network inputs carry no prunable channels."""


@channel_rule("param", "constant")
def parameter_rule(ctx: RuleContext) -> None:
    """Every dim of a directly used parameter (longer than one) is an independent set of channels."""
    shape = ctx.out_shape
    factors = []
    for dim, size in enumerate(shape):
        if size > 1:
            ids = ctx.new((size,))
            ctx.member("value", dim, ids, "param")
            factors.append(Factor((dim,), ids))
    ctx.set_output(Labeling(len(shape), tuple(factors)) if factors else None)


def _passthrough_others(ctx: RuleContext, x, channel_dim: int) -> None:
    labeling = ctx.labels(x)
    if labeling is not None:
        for factor in labeling.factors:
            if channel_dim not in factor.dims:
                ctx.block(factor, "a convolution mixes this dim")


def _conv(ctx: RuleContext, transposed: bool) -> None:
    module, x = ctx.module, ctx.arg(0, "input")
    rank = len(ctx.shape(x))
    channel = rank - len(module.kernel_size) - 1
    in_ids = ctx.along(x, channel)
    out_ids = ctx.new((module.out_channels,))
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    groups = module.groups
    if groups == 1:
        ctx.member("weight", in_dim, in_ids, "in")
    elif in_ids is None:
        ctx.block(out_ids, "grouped convolution whose input channels are fixed")
    else:
        blocks = np.concatenate([in_ids.reshape(groups, -1), out_ids.reshape(groups, -1)], axis=1)
        ctx.record.union(blocks[:, :1], blocks)
        if transposed:
            ctx.member("weight", 0, in_ids, "in")
    ctx.member("weight", out_dim, out_ids, "out")
    if module.bias is not None:
        ctx.member("bias", 0, out_ids, "out")
    _passthrough_others(ctx, x, channel)
    ctx.set_output(Labeling.single(rank, channel, out_ids))


@channel_rule("Conv1d", "Conv2d", "Conv3d")
def conv_rule(ctx: RuleContext) -> None:
    """Output channels are new; input channels are consumed (grouped: whole groups couple input and output)."""
    _conv(ctx, transposed=False)


@channel_rule("ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")
def conv_transpose_rule(ctx: RuleContext) -> None:
    """As convolution, with the weight's in/out dims swapped."""
    _conv(ctx, transposed=True)


@channel_rule("Linear")
def linear_rule(ctx: RuleContext) -> None:
    """Last dim: input features consumed, output features new; other labelled dims pass through."""
    x = ctx.arg(0, "input")
    rank = len(ctx.shape(x))
    in_ids = ctx.along(x, -1)
    out_ids = ctx.new((ctx.module.out_features,))
    ctx.member("weight", 1, in_ids, "in")
    ctx.member("weight", 0, out_ids, "out")
    if ctx.module.bias is not None:
        ctx.member("bias", 0, out_ids, "out")
    labeling = ctx.labels(x)
    kept = tuple(f for f in labeling.factors if rank - 1 not in f.dims) if labeling else ()
    ctx.set_output(Labeling(rank, kept + (Factor((rank - 1,), out_ids),)))


@channel_rule("Embedding")
def embedding_rule(ctx: RuleContext) -> None:
    """The embedding dim is a new set of channels (the vocabulary is indexed by data and stays); automatic plans
    leave it alone, since it is the residual width of every layer after it."""
    out_ids = ctx.new((ctx.module.embedding_dim,))
    ctx.member("weight", 1, out_ids, "out")
    ctx.explicit_only(out_ids, "the hidden size of the residual stream that starts at this embedding: pruned only "
                               "when a plan names this group")
    ctx.set_output(Labeling.single(len(ctx.out_shape), -1, out_ids))


@channel_rule("torch.nn.functional.embedding", "torch.embedding")
def functional_embedding_rule(ctx: RuleContext) -> None:
    """``F.embedding(ids, weight)`` (an ``nn.Embedding`` subclass that scales its output is traced into): the output's
    last dim carries the weight's columns, pruned only when named like the embedding layer's; the rows are indexed by
    the input's values and stay."""
    weight = ctx.arg(1, "weight")
    labeling = ctx.labels(weight)
    if labeling is None or len(ctx.shape(weight)) != 2:
        ctx.block(labeling, "an embedding table that is not a 2-D parameter")
        return
    ctx.block(ctx.along(weight, 0), "embedding rows are looked up by the input's values")
    columns = ctx.along(weight, 1)
    ctx.explicit_only(columns, "the hidden size of the residual stream that starts at this embedding: pruned only "
                               "when a plan names this group")
    ctx.set_output(Labeling.single(len(ctx.out_shape), -1, columns) if columns is not None else None)


def _channel_params(ctx: RuleContext, names: tuple[str, ...], ids, role: str = "param") -> None:
    for name in names:
        if getattr(ctx.module, name, None) is not None:
            ctx.member(name, 0, ids, role)


@channel_rule("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d",
              "InstanceNorm3d")
def batch_norm_rule(ctx: RuleContext) -> None:
    """Per-channel affine parameters and statistics follow the channel dim (dim 1)."""
    x = ctx.arg(0, "input")
    ids = ctx.along(x, 1)
    _channel_params(ctx, ("weight", "bias", "running_mean", "running_var"), ids)
    ctx.set_output(ctx.labels(x))


@channel_rule("GroupNorm")
def group_norm_rule(ctx: RuleContext) -> None:
    """Channels of one normalisation group are removed together, so every remaining group keeps its statistics."""
    x = ctx.arg(0, "input")
    ids = ctx.along(x, 1)
    if ids is not None:
        blocks = ids.reshape(ctx.module.num_groups, -1)
        ctx.record.union(blocks[:, :1], blocks)
    _channel_params(ctx, ("weight", "bias"), ids)
    ctx.set_output(ctx.labels(x))


@channel_rule("LayerNorm", "RMSNorm")
def layer_norm_rule(ctx: RuleContext) -> None:
    """Normalised dims follow their affine parameters; removing one changes the others' statistics (inexact)."""
    x = ctx.arg(0, "input")
    rank = len(ctx.shape(x))
    count = len(ctx.module.normalized_shape)
    for offset in range(count):
        dim = rank - count + offset
        ids = ctx.along(x, dim)
        for name in ("weight", "bias"):
            if getattr(ctx.module, name, None) is not None:
                ctx.member(name, offset, ids, "param")
        ctx.inexact(ids, "normalised over channels")
    ctx.set_output(ctx.labels(x))


@channel_rule("PReLU")
def prelu_rule(ctx: RuleContext) -> None:
    """A per-channel slope follows the channel dim."""
    x = ctx.arg(0, "input")
    if ctx.module.num_parameters > 1:
        ctx.member("weight", 0, ctx.along(x, 1), "param")
    ctx.set_output(ctx.labels(x))


def _head_rows(head_ids: np.ndarray, head_dim: int, copies: int) -> np.ndarray:
    """Ids of the rows of ``copies`` stacked (heads x head_dim) projections: every row of head h carries its id."""
    return np.tile(np.repeat(head_ids, head_dim), copies)


_MHA_EXPLICIT = ("pruning makes this nn.MultiheadAttention a PrunedMultiheadAttention (inner width other than "
                 "embed_dim): pruned only when a plan names this group")


@channel_rule("MultiheadAttention")
def multihead_attention_rule(ctx: RuleContext) -> None:
    """``nn.MultiheadAttention`` as projections around attention: query/key/value widths are consumed by the input
    projections' columns, the output width is new (out_proj rows), and whole heads are q/k/v rows of a head with its
    out_proj columns. After pruning the module runs with an inner width other than ``embed_dim`` (layer_sync)."""
    module = ctx.module
    query, key, value = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    refs = [ref for ref in ctx.tensor_args() if ref not in (query, key, value)]
    for ref in refs:
        ctx.block(ctx.labels(ref), "an attention mask of nn.MultiheadAttention")
    unsupported = (len(ctx.shape(query)) != 3 and "unbatched input") or (
        module.bias_k is not None and "bias_k/bias_v") or (module.add_zero_attn and "add_zero_attn")
    inputs = [(query, "q_proj_weight"), (key, "k_proj_weight"), (value, "v_proj_weight")]
    if unsupported:
        for ref, _ in inputs:
            ctx.block(ctx.labels(ref), f"nn.MultiheadAttention with {unsupported}")
        return
    for ref, weight in inputs:
        ctx.member("in_proj_weight" if module._qkv_same_embed_dim else weight, 1, ctx.along(ref, -1), "in")
        labeling = ctx.labels(ref)
        for factor in labeling.factors if labeling else ():
            if 2 not in factor.dims:
                ctx.block(factor, "nn.MultiheadAttention mixes this dim")
    heads = ctx.new((module.num_heads,))
    if module._qkv_same_embed_dim:
        ctx.member("in_proj_weight", 0, _head_rows(heads, module.head_dim, 3), "out")
    else:
        for _, weight in inputs:
            ctx.member(weight, 0, _head_rows(heads, module.head_dim, 1), "out")
    if module.in_proj_bias is not None:
        ctx.member("in_proj_bias", 0, _head_rows(heads, module.head_dim, 3), "out")
    ctx.member("out_proj.weight", 1, _head_rows(heads, module.head_dim, 1), "in")
    if ctx.arg(4, "need_weights", True):
        ctx.inexact(heads, "attention weights averaged over heads are returned")
    out_ids = ctx.new((module.out_proj.out_features,))
    ctx.member("out_proj.weight", 0, out_ids, "out")
    if module.out_proj.bias is not None:
        ctx.member("out_proj.bias", 0, out_ids, "out")
    for ids in (heads, out_ids, *(ctx.along(ref, -1) for ref, _ in inputs)):
        ctx.explicit_only(ids, _MHA_EXPLICIT)
    ctx.set_output(Labeling.single(3, 2, out_ids), (0,))
