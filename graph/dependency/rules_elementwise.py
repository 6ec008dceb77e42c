"""Channel rules for ops that keep positions where they are: element-wise maps, broadcasting, normalisations."""
from __future__ import annotations

import numpy as np

from .context import RuleContext
from .labels import Factor, Labeling
from .registry import channel_rule

_F = "torch.nn.functional."
_UNARY_NAMES = (
    "relu", "relu_", "relu6", "sigmoid", "sigmoid_", "tanh", "tanh_", "gelu", "silu", "hardswish", "hardsigmoid",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "hardtanh", "dropout", "dropout1d", "dropout2d",
    "dropout3d", "alpha_dropout", "clone", "contiguous", "detach", "to", "float", "half", "bfloat16", "double",
    "type_as", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "clamp", "clamp_",
    "clamp_min", "clamp_max", "sign", "floor", "ceil", "round", "erf", "square", "nan_to_num", "logical_not",
    "__neg__", "__pos__", "__abs__", "__invert__", "cpu", "cuda", "requires_grad_", "data", "detach_", "zero_",
    "fill_", "hardswish_", "exp_", "sqrt_", "neg_", "logsigmoid", "log_sigmoid", "softsign", "tanhshrink",
    "threshold", "relu6_", "hardtanh_", "leaky_relu_", "elu_", "silu_", "mish_", "gelu_", "erfc", "expm1", "log1p",
    "sigmoid", "pow_", "masked_fill_", "bool", "int", "long", "sin_", "cos_",
)
_UNARY_LEAVES = ("ReLU", "ReLU6", "LeakyReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Hardswish",
                 "Hardsigmoid", "Hardtanh", "Sigmoid", "Tanh", "Softplus", "Softsign", "Tanhshrink", "Threshold",
                 "LogSigmoid", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "Identity",
                 "StochasticDepth")
_BINARY_NAMES = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "floor_divide", "where", "maximum",
    "minimum", "masked_fill", "pow", "lerp", "addcmul", "addcdiv", "eq", "ne", "lt", "le", "gt", "ge",
    "logical_and", "logical_or", "bitwise_and", "bitwise_or", "fmod", "remainder", "rsub", "copy_", "mul_",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__pow__",
    "__rpow__", "__ipow__", "__and__", "__or__", "__xor__", "__rand__", "__ror__", "__iand__", "__ior__",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "expand_as", "glu_", "clamp_min_",
)


def _names(short: tuple[str, ...]) -> list[str]:
    return [f"{prefix}{name}" for name in short for prefix in ("torch.", "Tensor.", _F)]


@channel_rule(*_names(_UNARY_NAMES), *_UNARY_LEAVES)
def unary_rule(ctx: RuleContext) -> None:
    """Element-wise maps: the output carries the first tensor argument's channels."""
    refs = ctx.tensor_args()
    _freeze_channel_scalars(ctx)
    ctx.set_output(ctx.labels(refs[0]) if refs else None)


def _freeze_channel_scalars(ctx: RuleContext) -> None:
    """Scalar operands computed from channel sizes (``q * (C // heads) ** -0.5``) keep their captured value after
    pruning, as in the masked network (replayed from the pruned sizes they would change the result)."""
    frozen = {key: ctx.captured_value(value) for key, value in [*enumerate(ctx.node.args), *ctx.node.kwargs.items()]
              if ctx.reads_channel_sizes_only(value)}
    if frozen:
        ctx.rewrite(_frozen_rewrite(frozen))


def _frozen_rewrite(frozen: dict):
    def rewrite(node, removed):
        node.args = tuple(frozen.get(i, value) for i, value in enumerate(node.args))
        node.kwargs = {name: frozen.get(name, value) for name, value in node.kwargs.items()}
    return rewrite


@channel_rule(*_names(_BINARY_NAMES))
def broadcast_rule(ctx: RuleContext) -> None:
    """Broadcasting ops: channels meeting at the same output position are coupled.

    A labelled dim that meets a full-size unlabelled dim (a tensor that cannot be sliced) is collapsed.
    """
    _freeze_channel_scalars(ctx)
    out_shape = ctx.out_shape
    rank = len(out_shape)
    operands = []
    for ref in ctx.tensor_args():
        shape = ctx.shape(ref)
        offset = rank - len(shape)
        labeling = ctx.labels(ref)
        if labeling is not None:
            labeling = labeling.remap({d: d + offset for d in range(len(shape))}, rank)
        operands.append(((1,) * offset + tuple(shape), labeling))
    for dim in range(rank):
        if out_shape[dim] <= 1:
            continue
        fixed = any(shape[dim] == out_shape[dim] and (lab is None or lab.factor_at(dim) is None)
                    for shape, lab in operands)
        if fixed:
            operands = [(shape, ctx.collapse(lab, dim, _FIXED_REASON)) for shape, lab in operands]
    operands = _unsplit_shared_dims(ctx, [lab for _, lab in operands])
    merged: dict[tuple[int, ...], np.ndarray] = {}
    for labeling in operands:
        for factor in labeling.factors if labeling else ():
            if factor.dims in merged:
                ctx.record.union(merged[factor.dims], factor.ids)
            else:
                merged[factor.dims] = factor.ids
    ctx.set_output(Labeling(rank, tuple(Factor(d, i) for d, i in merged.items())) if merged else None)


_FIXED_REASON = ("meets a full-size dim of a tensor that is never sliced (e.g. head_dim: rotary pairs its halves), so "
                 "these channels (a per-head norm weight, rotary frequencies) stay intact")
_SHARED_REASON = ("a tensor shared by every slice of the other dims (rotary cos/sin, a per-head norm weight) "
                  "meets this dim, so it is never partially pruned")


def _unsplit_shared_dims(ctx: RuleContext, labelings: list[Labeling | None]) -> list[Labeling | None]:
    """Resolve operands whose factors split overlapping dims differently (heads x head_dim meeting head_dim only).

    A narrower factor computed from the wider one (a per-head statistic) is coupled with it and the wider one's extra
    dims collapse; an independent one (rotary cos/sin, a norm weight) is blocked and the shared dims collapse, so the
    wider factor's own dims (the heads) stay prunable.
    """
    while True:
        clash = _first_clash(labelings)
        if clash is None:
            return labelings
        i, wide, j, narrow = clash
        derived = set(narrow.dims) < set(wide.dims) and np.isin(narrow.ids, wide.ids).all()
        if derived:
            for dim in set(wide.dims) - set(narrow.dims):
                labelings[i] = ctx.collapse(labelings[i], dim)
            continue
        for dim in set(wide.dims) & set(narrow.dims):
            for k in (i, j):
                factor = labelings[k].factor_at(dim) if labelings[k] is not None else None
                if factor is not None and len(factor.dims) == 1:
                    ctx.block(factor, _SHARED_REASON)
                labelings[k] = ctx.collapse(labelings[k], dim)


def _first_clash(labelings: list[Labeling | None]):
    """``(i, wide, j, narrow)``: two factors of different operands over overlapping but different dims."""
    for i, first in enumerate(labelings):
        for j in range(i + 1, len(labelings)):
            for a in first.factors if first else ():
                for b in labelings[j].factors if labelings[j] else ():
                    if a.dims != b.dims and set(a.dims) & set(b.dims):
                        return (i, a, j, b) if len(a.dims) >= len(b.dims) else (j, b, i, a)
    return None


def _dim_argument(ctx: RuleContext, position: int, attribute: str | None = None) -> int | None:
    if attribute is not None and ctx.module is not None:
        return getattr(ctx.module, attribute)
    return ctx.arg(position, "dim")


@channel_rule("Softmax", "LogSoftmax", *_names(("softmax", "log_softmax")))
def softmax_rule(ctx: RuleContext) -> None:
    """Channels pass through; those along the normalised dim affect each other (inexact)."""
    x = ctx.tensor_args()[0]
    labeling = ctx.labels(x)
    dim = _dim_argument(ctx, 1, "dim" if ctx.module is not None and hasattr(ctx.module, "dim") else None)
    if labeling is not None and dim is not None:
        ctx.inexact(labeling.factor_at(dim), "softmax over channels")
    ctx.set_output(labeling)


@channel_rule(*_names(("normalize",)))
def normalize_rule(ctx: RuleContext) -> None:
    """``F.normalize`` over ``dim``: a joint factor (heads x head_dim) is collapsed along it, so whole rows go and the
    others keep their norms (exact); channels of a factor over ``dim`` alone change each other's norm (inexact)."""
    x = ctx.tensor_args()[0]
    labeling = ctx.labels(x)
    dim = ctx.arg(2, "dim", 1)
    factor = labeling.factor_at(dim) if labeling is not None else None
    if factor is not None and len(factor.dims) > 1:
        labeling = ctx.collapse(labeling, dim)
    elif factor is not None:
        ctx.inexact(factor, "normalised over channels")
    ctx.set_output(labeling)


@channel_rule(*_names(("batch_norm",)))
def functional_batch_norm_rule(ctx: RuleContext) -> None:
    """``F.batch_norm(x, mean, var, weight, bias)`` with parameters as nodes: all follow dim 1."""
    x = ctx.arg(0, "input")
    ids = ctx.along(x, 1)
    for position, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        _match(ctx, ctx.arg(position, name), 0, ids)
    ctx.set_output(ctx.labels(x))


@channel_rule(*_names(("layer_norm", "rms_norm")))
def functional_layer_norm_rule(ctx: RuleContext) -> None:
    """``F.layer_norm(x, shape, weight, bias)``: normalised dims follow the parameters; shape is rewritten."""
    x, normalized = ctx.arg(0, "input"), ctx.arg(1, "normalized_shape")
    rank = len(ctx.shape(x))
    count = len(normalized)
    for offset in range(count):
        dim = rank - count + offset
        ids = ctx.along(x, dim)
        for position, name in ((2, "weight"), (3, "bias")):
            _match(ctx, ctx.arg(position, name), offset, ids)
        if ctx.is_constant(normalized[offset]):
            ctx.size_arg(("args", 1, offset) if len(ctx.node.args) > 1 else ("kwargs", "normalized_shape", offset),
                         ids)
        ctx.inexact(ids, "normalised over channels")
    ctx.set_output(ctx.labels(x))


def _match(ctx: RuleContext, ref, dim: int, ids) -> None:
    """Couple a parameter node's ``dim`` with ``ids``; if ``ids`` is ``None`` the parameter's dim is fixed."""
    other = ctx.along(ref, dim) if ref is not None else None
    if other is None:
        if ids is not None and ref is not None and ctx.shape(ref) and ctx.shape(ref)[dim] > 1:
            ctx.block(ids, "meets a tensor that cannot be sliced")
        return
    if ids is None:
        ctx.block(other, "meets a dim that cannot be pruned")
    else:
        ctx.record.union(ids, other)
