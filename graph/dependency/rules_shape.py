"""Channel rules for ops that move, merge, split, select, reduce or contract dims."""
from __future__ import annotations

import string

import numpy as np

from ..ir import Ref, Sym
from .context import RuleContext
from .labels import Factor, Labeling
from .registry import channel_rule
from .rules_elementwise import _names


def _in_out(ctx: RuleContext):
    x = ctx.tensor_args()[0]
    return x, ctx.labels(x), tuple(ctx.shape(x)), tuple(ctx.out_shape)


# ------------------------------------------------------------------ permutations
def _permutation(ctx: RuleContext, rank: int) -> list[int]:
    op = ctx.node.op.rsplit(".", 1)[-1]
    args = ctx.node.args[1:]
    if op == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args or ctx.node.kwargs["dims"]
        return [d % rank for d in dims]
    order = list(range(rank))
    if op in ("transpose", "swapaxes", "swapdims", "mT", "t", "T"):
        if op in ("mT",) or (op in ("t",) and rank == 2):
            a, b = rank - 2, rank - 1
        elif op == "T":
            return order[::-1]
        else:
            a, b = (d % rank for d in (args[0], args[1]))
        order[a], order[b] = order[b], order[a]
        return order
    if op == "movedim":
        source, destination = args[0], args[1]
        source = [source] if isinstance(source, int) else list(source)
        destination = [destination] if isinstance(destination, int) else list(destination)
        rest = [d for d in order if d not in [s % rank for s in source]]
        result = [None] * rank
        for s, d in zip(source, destination):
            result[d % rank] = s % rank
        fill = iter(rest)
        return [r if r is not None else next(fill) for r in result]
    raise KeyError(op)


@channel_rule(*_names(("permute", "transpose", "swapaxes", "swapdims", "movedim", "t")), "Tensor.T", "Tensor.mT")
def permute_rule(ctx: RuleContext) -> None:
    """Channels move with their dims."""
    _, labeling, shape, _ = _in_out(ctx)
    if labeling is not None:
        order = _permutation(ctx, len(shape))
        ctx.set_output(labeling.remap({old: new for new, old in enumerate(order)}, len(shape)))


# ------------------------------------------------------------------ reshapes
def reshape_labels(ctx: RuleContext, labeling: Labeling | None, in_shape, out_shape) -> Labeling | None:
    """Carry every factor through a reshape by reshaping its broadcast ids; the dims where they vary are kept."""
    if labeling is None:
        return None
    factors: list[Factor] = []
    taken: set[int] = set()
    for factor in labeling.factors:
        view = [in_shape[d] if d in factor.dims else 1 for d in range(len(in_shape))]
        order = np.argsort(np.argsort(factor.dims))
        ids = np.transpose(factor.ids, np.argsort(factor.dims)) if len(factor.dims) > 1 else factor.ids
        del order
        full = np.broadcast_to(ids.reshape(view), in_shape).reshape(out_shape)
        varying = tuple(d for d in range(len(out_shape)) if out_shape[d] > 1 and not np.all(
            full == full.take([0], axis=d)))
        if not varying or taken & set(varying):
            ctx.block(factor, "a reshape mixes channels with another dim")
            continue
        taken |= set(varying)
        index = tuple(slice(None) if d in varying else 0 for d in range(len(out_shape)))
        factors.append(Factor(varying, full[index]))
    return Labeling(len(out_shape), tuple(factors)) if factors else None


def _shape_entries(ctx: RuleContext):
    """(path, value) of each entry of a view/reshape target shape, by output dim."""
    args = ctx.node.args[1:]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return [(("args", 1, i), v) for i, v in enumerate(args[0])]
    if args:
        return [(("args", i + 1), v) for i, v in enumerate(args)]
    shape = ctx.node.kwargs.get("shape") or ctx.node.kwargs.get("size")
    return [(("kwargs", "shape", i), v) for i, v in enumerate(shape or ())]


def _declare_shape_constants(ctx: RuleContext, labeling: Labeling | None, entries) -> None:
    for dim, (path, value) in enumerate(entries):
        factor = labeling.factor_at(dim) if labeling is not None else None
        if factor is not None and ((ctx.is_constant(value) and value != -1) or ctx.reads_channel_sizes_only(value)):
            ctx.size_arg(path, factor.rows(dim))


_COMPUTED_SIZE = "the target size of this channel dim is computed from sizes that pruning it leaves unchanged"


def _size_reads(expr) -> list[tuple[Ref, int]]:
    """Every ``(tensor, dim)`` whose size a symbolic expression reads."""
    if isinstance(expr, tuple) and expr and expr[0] == "size":
        return [(expr[1], expr[2])]
    if isinstance(expr, (tuple, list)):
        return [read for item in expr for read in _size_reads(item)]
    return []


def _fix_computed_sizes(ctx: RuleContext, labeling: Labeling | None, entries) -> Labeling | None:
    """A channel dim whose target size is computed from batch or spatial sizes must be pruned with the channels it
    reads (``x.view(b, x.size(1) * x.size(2), -1)``): checked once components are known; a dim that reads no channel
    size stays whole. One computed from channel sizes alone is rewritten like a constant."""
    for dim, (_, value) in enumerate(entries):
        factor = labeling.factor_at(dim) if labeling is not None else None
        if factor is None or not isinstance(value, Sym) or ctx.reads_channel_sizes_only(value):
            continue
        sources = [ctx.labels(ref).factor_at(d) for ref, d in _size_reads(value.expr)
                   if isinstance(ref, Ref) and ctx.labels(ref) is not None]
        sources = [source.ids.ravel() for source in sources if source is not None]
        if sources:
            ctx.size_constraint(np.moveaxis(factor.ids, factor.dims.index(dim), 0), np.concatenate(sources),
                                _COMPUTED_SIZE)
        else:
            labeling = ctx.collapse(labeling, dim, _COMPUTED_SIZE)
    return labeling


@channel_rule(*_names(("view", "reshape")))
def view_rule(ctx: RuleContext) -> None:
    """Reshape with an explicit target: constant entries that count channels are rewritten after pruning."""
    _, labeling, in_shape, out_shape = _in_out(ctx)
    entries = _shape_entries(ctx)
    result = _fix_computed_sizes(ctx, reshape_labels(ctx, labeling, in_shape, out_shape), entries)
    _declare_shape_constants(ctx, result, entries)
    ctx.set_output(result)


@channel_rule(*_names(("flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as")), "Flatten",
              "Unflatten")
def derived_reshape_rule(ctx: RuleContext) -> None:
    """Reshapes whose target is derived from the input (flatten, squeeze …) or from another tensor."""
    _, labeling, in_shape, out_shape = _in_out(ctx)
    result = reshape_labels(ctx, labeling, in_shape, out_shape)
    if ctx.node.op.endswith("unflatten"):
        sizes = ctx.arg(2, "sizes")
        entries = [(("args", 2, i), v) for i, v in enumerate(sizes)]
        start = ctx.arg(1, "dim") % len(in_shape)
        _declare_shape_constants(ctx, result, [((), None)] * start + entries)
    if ctx.node.op.endswith(("view_as", "reshape_as")):
        other = ctx.labels(ctx.tensor_args()[1])
        for factor in result.factors if result else ():
            match = other.factor_at(factor.dims[0]) if other else None
            if match is not None and match.dims == factor.dims:
                ctx.record.union(match.ids, factor.ids)
            else:
                ctx.block(factor, "reshaped to the shape of a tensor that cannot be sliced")
    ctx.set_output(result)


@channel_rule("Tensor.expand", "torch.broadcast_to")
def expand_rule(ctx: RuleContext) -> None:
    """Existing dims keep their channels; constant sizes of channel dims are rewritten."""
    _, labeling, in_shape, out_shape = _in_out(ctx)
    offset = len(out_shape) - len(in_shape)
    result = labeling.remap({d: d + offset for d in range(len(in_shape))}, len(out_shape)) if labeling else None
    _declare_shape_constants(ctx, result, _shape_entries(ctx))
    ctx.set_output(result)


# ------------------------------------------------------------------ same-rank ops that resize some dims
@channel_rule("MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
              "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d",
              "AdaptiveMaxPool3d", "Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d", "ZeroPad1d",
              "ZeroPad2d", "ZeroPad3d", "ConstantPad1d", "ConstantPad2d", "ConstantPad3d", "ReflectionPad1d",
              "ReflectionPad2d", "ReplicationPad1d", "ReplicationPad2d", "LocalResponseNorm",
              *_names(("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                       "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
                       "adaptive_max_pool2d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
                       "pad", "dropout2d", "local_response_norm")))
def resize_rule(ctx: RuleContext) -> None:
    """Channels pass where a dim keeps its size; a labelled dim that is resized cannot be pruned."""
    _, labeling, in_shape, out_shape = _in_out(ctx)
    out_shape = out_shape if isinstance(out_shape, tuple) else tuple(out_shape[0])
    if labeling is None:
        return
    if len(in_shape) != len(out_shape):
        ctx.block(labeling, "rank changes")
        return
    kept = []
    for factor in labeling.factors:
        if all(in_shape[d] == out_shape[d] for d in factor.dims):
            kept.append(factor)
        else:
            ctx.block(factor, "resizes a channel dim")
    if ctx.node.op.endswith(("LocalResponseNorm", "local_response_norm")):
        ctx.inexact(labeling.factor_at(1), "normalised across neighbouring channels")
    ctx.set_output(Labeling(len(out_shape), tuple(kept)) if kept else None)


@channel_rule("PixelShuffle", *_names(("pixel_shuffle",)))
def pixel_shuffle_rule(ctx: RuleContext) -> None:
    """Output channel c is made of input channels c*r^2 … (c+1)*r^2-1: they are removed together."""
    x, labeling, in_shape, out_shape = _in_out(ctx)
    ids = ctx.along(x, -3)
    if ids is not None:
        blocks = ids.reshape(out_shape[-3], -1)
        ctx.record.union(blocks[:, :1], blocks)
        ctx.set_output(Labeling.single(len(out_shape), -3, blocks[:, 0]))


@channel_rule("ChannelShuffle", *_names(("channel_shuffle", "native_channel_shuffle")))
def channel_shuffle_rule(ctx: RuleContext) -> None:
    """Channels are permuted group-wise; each keeps its identity."""
    x, _, _, out_shape = _in_out(ctx)
    ids = ctx.along(x, 1)
    groups = ctx.module.groups if ctx.module is not None else ctx.arg(1, "groups")
    if ids is not None:
        columns = ids.reshape(groups, -1)
        ctx.record.union(columns[:1], columns)
        ctx.set_output(Labeling.single(len(out_shape), 1, columns.T.ravel()))


# ------------------------------------------------------------------ positional selection
@channel_rule(*_names(("cat", "concat", "concatenate")))
def cat_rule(ctx: RuleContext) -> None:
    """Channels of the concatenated dim keep their order with offsets; other dims are coupled across inputs. Parts
    whose concatenated dim is split jointly with the same other dims (the halves of heads x head_dim that rotate-half
    swaps) stay one joint factor."""
    tensors = ctx.arg(0, "tensors")
    rank = len(ctx.out_shape)
    dim = ctx.arg(1, "dim", 0) % rank
    labelings = [ctx.labels(ref) for ref in tensors]
    joint = [labeling.factor_at(dim) if labeling is not None else None for labeling in labelings]
    if all(f is not None and len(f.dims) > 1 and f.dims == joint[0].dims for f in joint):
        axis = joint[0].dims.index(dim)
        concatenated = Factor(joint[0].dims, np.concatenate([f.ids for f in joint], axis=axis))
        others = [labeling.replace(f, None) for labeling, f in zip(labelings, joint)]
    else:
        concatenated, others = _cat_along(ctx, tensors, dim, rank)
    merged: dict[tuple, np.ndarray] = {}
    for labeling in others:
        for factor in labeling.factors if labeling else ():
            if factor.dims in merged:
                ctx.record.union(merged[factor.dims], factor.ids)
            else:
                merged[factor.dims] = factor.ids
    factors = [Factor(d, i) for d, i in merged.items()] + [concatenated]
    ctx.set_output(Labeling(rank, tuple(factors)))


def _cat_along(ctx: RuleContext, tensors, dim: int, rank: int) -> tuple[Factor, list[Labeling | None]]:
    """The concatenated dim's 1-d factor (unlabelled parts get blocked ids) and each part's other dims."""
    parts, others = [], []
    for ref in tensors:
        ids = ctx.along(ref, dim)
        if ids is None:
            ids = ctx.new((ctx.shape(ref)[dim],))
            ctx.record.block(ids, f"concatenated with channels that cannot be pruned at {ctx.node.describe()}")
        parts.append(ids)
        labeling = ctx.labels(ref)
        others.append(labeling.remap({d: d for d in range(rank) if d != dim}, rank) if labeling else None)
    return Factor((dim,), np.concatenate(parts)), others


@channel_rule(*_names(("stack",)))
def stack_rule(ctx: RuleContext) -> None:
    """Stacked tensors share channels position-wise; the new dim carries none."""
    tensors = ctx.arg(0, "tensors")
    rank = len(ctx.out_shape)
    dim = ctx.arg(1, "dim", 0) % rank
    mapping = {d: d + (d >= dim) for d in range(rank - 1)}
    merged: dict[tuple, np.ndarray] = {}
    for ref in tensors:
        labeling = ctx.labels(ref)
        for factor in labeling.remap(mapping, rank).factors if labeling else ():
            if factor.dims in merged:
                ctx.record.union(merged[factor.dims], factor.ids)
            else:
                merged[factor.dims] = factor.ids
    ctx.set_output(Labeling(rank, tuple(Factor(d, i) for d, i in merged.items())) if merged else None)


@channel_rule(*_names(("split", "chunk", "tensor_split", "split_with_sizes")))
def split_rule(ctx: RuleContext) -> None:
    """Each part keeps its slice of the split dim; after pruning the op becomes a split by the kept counts."""
    x = ctx.tensor_args()[0]
    labeling = ctx.labels(x)
    shapes = ctx.out_shape
    rank = len(shapes[0])
    dim = ctx.arg(2, "dim", 0) % rank
    ids = ctx.along(x, dim)
    factor = labeling.factor_at(dim) if labeling else None
    others = labeling.replace(factor, None) if factor else labeling
    start = 0
    bounds = []
    for index, shape in enumerate(shapes):
        size = shape[dim]
        factors = others.factors if others else ()
        if ids is not None:
            factors = factors + (Factor((dim,), ids[start:start + size]),)
        ctx.set_output(Labeling(rank, factors) if factors else None, (index,))
        bounds.append((start, start + size))
        start += size
    if ids is not None:
        ctx.rewrite(_split_rewrite(ids, bounds, dim))


def _split_rewrite(ids: np.ndarray, bounds: list[tuple[int, int]], dim: int):
    def rewrite(node, removed):
        keep = ~removed(ids)
        sizes = [int(keep[a:b].sum()) for a, b in bounds]
        node.op, node.args, node.kwargs = "torch.split", (node.args[0], sizes, dim), {}
    return rewrite


@channel_rule("Tensor.__getitem__")
def getitem_rule(ctx: RuleContext) -> None:
    """Basic indexing: slices of a channel dim keep their channels (bounds are rewritten); ints drop the dim."""
    _, labeling, in_shape, out_shape = _in_out(ctx)
    index = ctx.node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, Ref) or isinstance(i, (list,)) for i in index):
        _advanced_index(ctx, labeling, index, len(in_shape), len(out_shape))
        return
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    mapping, slices, in_dim, out_dim = {}, {}, 0, 0
    for position, item in enumerate(index):
        if item is Ellipsis:
            skip = len(in_shape) - explicit
            for _ in range(skip):
                mapping[in_dim], in_dim, out_dim = out_dim, in_dim + 1, out_dim + 1
        elif item is None:
            out_dim += 1
        elif isinstance(item, slice):
            slices[in_dim] = (item, position)
            mapping[in_dim], in_dim, out_dim = out_dim, in_dim + 1, out_dim + 1
        else:
            factor = labeling.factor_at(in_dim) if labeling is not None else None
            if factor is not None and len(factor.dims) > 1:
                labeling = ctx.collapse(labeling, in_dim)
            in_dim += 1
    while in_dim < len(in_shape):
        mapping[in_dim], in_dim, out_dim = out_dim, in_dim + 1, out_dim + 1
    for d, (item, position) in slices.items():
        bounds = (item.start, item.stop, item.step)
        if all(ctx.reads_channel_sizes_only(v) for v in bounds if isinstance(v, Sym)):
            slices[d] = (slice(*(ctx.captured_value(v) for v in bounds)), position)
        elif labeling is not None:
            labeling = ctx.collapse(labeling, d)
    if labeling is None:
        return
    factors = []
    for factor in labeling.factors:
        if not all(d in mapping for d in factor.dims):
            ctx.block(factor, "an integer index selects a single channel")
            continue
        ids = factor.ids
        for d in factor.dims:
            if d in slices:
                item, position = slices[d]
                axis = factor.dims.index(d)
                start, stop, step = item.start, item.stop, item.step
                if step not in (None, 1):
                    ctx.block(factor, "a strided slice of a channel dim")
                    break
                positions = range(in_shape[d])[slice(start, stop)]
                ids = np.take(ids, list(positions), axis=axis)
                if len(positions) != in_shape[d]:
                    ctx.rewrite(_slice_rewrite(factor.rows(d), position, positions.start, positions.stop))
        else:
            factors.append(Factor(tuple(mapping[d] for d in factor.dims), ids))
    ctx.set_output(Labeling(len(out_shape), tuple(factors)) if factors else None)


def _advanced_index(ctx: RuleContext, labeling: Labeling | None, index: tuple, rank: int, out_rank: int) -> None:
    """``x[idx]`` / ``x[idx, :, ...]`` (a lookup table): the other dims keep their channels; everything else (the
    indexed dim, the index tensor, other index forms) is blocked."""
    lookup = isinstance(index[0], Ref) and all(i == slice(None) for i in index[1:])
    for ref in ctx.tensor_args()[1:]:
        ctx.block(ctx.labels(ref), "used as an index")
    if not lookup or labeling is None:
        ctx.block(labeling, "advanced indexing")
        return
    factor = labeling.factor_at(0)
    if factor is not None:
        ctx.block(factor, "an index tensor selects along this channel dim")
        labeling = labeling.replace(factor, None)
    offset = out_rank - rank
    ctx.set_output(labeling.remap({d: d + offset for d in range(1, rank)}, out_rank) if labeling else None)


def _slice_rewrite(rows: np.ndarray, position: int, start: int, stop: int):
    """New bounds of the slice at ``position`` of the index, from which positions along its dim survive (``rows``:
    the ids at each position, one row each)."""
    def rewrite(node, removed):
        keep = ~removed(rows).all(axis=1)
        new = slice(int(keep[:start].sum()), int(keep[:stop].sum()))
        items = list(node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],))
        items[position] = new
        node.args = (node.args[0], tuple(items) if isinstance(node.args[1], tuple) else items[0])
    return rewrite


@channel_rule(*_names(("roll",)))
def roll_rule(ctx: RuleContext) -> None:
    """Channels pass along dims that are not rolled; a rolled channel dim is blocked (removing positions would change
    which of them wrap around), and a roll of the flattened tensor blocks everything."""
    _, labeling, in_shape, _ = _in_out(ctx)
    dims = ctx.arg(2, "dims")
    if labeling is None:
        return
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):
        ctx.block(labeling, "torch.roll of the flattened tensor mixes every dim")
        return
    for dim in ([dims] if isinstance(dims, int) else dims):
        factor = labeling.factor_at(dim) if labeling is not None else None
        if factor is not None:
            ctx.block(factor, "torch.roll shifts along this channel dim (pruning would change what wraps around)")
            labeling = labeling.replace(factor, None)
    ctx.set_output(labeling)


# ------------------------------------------------------------------ reductions
@channel_rule(*_names(("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod",
                       "nansum", "nanmean")))
def reduce_rule(ctx: RuleContext) -> None:
    """Reduced channel dims disappear (their removal changes the result: inexact); the others pass through."""
    _, labeling, in_shape, _ = _in_out(ctx)
    out_shape = ctx.out_shape
    out_shape = tuple(out_shape[0]) if isinstance(out_shape, list) else tuple(out_shape or ())
    dims = ctx.arg(1, "dim")
    if isinstance(dims, Ref) or labeling is None:
        ctx.block(labeling, "a reduction over a computed dim")
        return
    rank = len(in_shape)
    reduced = set(range(rank)) if dims is None else {d % rank for d in ((dims,) if isinstance(dims, int) else dims)}
    keepdim = len(out_shape) == rank
    for factor in labeling.factors:
        if set(factor.dims) <= reduced:
            ctx.inexact(factor, "summed over channels")
    for dim in reduced:
        labeling = ctx.collapse(labeling, dim) if labeling is not None and labeling.factor_at(dim) and any(
            d not in reduced for d in labeling.factor_at(dim).dims) else labeling
    if labeling is None:
        return
    mapping, out = {}, 0
    for d in range(rank):
        if d in reduced and not keepdim:
            continue
        if d not in reduced:
            mapping[d] = out
        out += 1
    result = labeling.remap(mapping, len(out_shape))
    if isinstance(ctx.out_shape, list):
        ctx.set_output(result, (0,))
    else:
        ctx.set_output(result)


# ------------------------------------------------------------------ contractions
def contract(ctx: RuleContext, operands: list[tuple[Ref, str]], output: str, path: tuple = ()) -> None:
    """Einsum semantics: equal letters are coupled; letters that vanish are contracted away."""
    by_letters: dict[str, np.ndarray] = {}
    out_size = {}
    for ref, letters in operands:
        shape = ctx.shape(ref)
        for letter, size in zip(letters, shape):
            out_size[letter] = max(out_size.get(letter, 1), size)
    placed: list[tuple[str, Labeling]] = []
    for ref, letters in operands:
        ctx.consumed(ref, [dim for dim, letter in enumerate(letters) if letter not in output])
        labeling = ctx.labels(ref)
        shape = ctx.shape(ref)
        for dim, letter in enumerate(letters):
            full = shape[dim] == out_size[letter] and out_size[letter] > 1
            if full and any(lab is None or lab.factor_at(d) is None for r, ls in operands
                            for d, l2 in enumerate(ls) if l2 == letter and ctx.shape(r)[d] == out_size[letter]
                            for lab in [ctx.labels(r)]):
                labeling = ctx.collapse(labeling, dim)
        placed.append((letters, labeling))
    _align_factors(ctx, placed)
    for letters, labeling in placed:
        for factor in labeling.factors if labeling else ():
            key = "".join(sorted(letters[d] for d in factor.dims))
            ordered = np.transpose(factor.ids, np.argsort([letters[d] for d in factor.dims]))
            if key in by_letters:
                ctx.record.union(by_letters[key], ordered)
            else:
                by_letters[key] = ordered
    factors = []
    for key, ids in by_letters.items():
        kept = [letter for letter in key if letter in output]
        for axis in reversed([i for i, letter in enumerate(key) if letter not in output]):
            moved = np.moveaxis(ids, axis, 0)
            if kept:
                ctx.record.union(moved[:1], moved)
            ids = moved[0]
        if kept:
            dims = tuple(output.index(letter) for letter in kept)
            factors.append(Factor(dims, ids))
    ctx.set_output(Labeling(len(output), tuple(factors)) if factors else None, path)


def _align_factors(ctx: RuleContext, placed: list[tuple[str, Labeling | None]]) -> None:
    """Where factors of different operands share a letter but not all letters, collapse the extra dims of the wider
    one (e.g. a value's heads x head_dim meeting attention weights' heads makes each whole head one element)."""
    while True:
        factors = [(i, factor, {letters[d] for d in factor.dims}) for i, (letters, labeling) in enumerate(placed)
                   for factor in (labeling.factors if labeling else ())]
        extra = next(((i, factor, own - other) for i, factor, own in factors for _, _, other in factors
                      if own & other and own - other), None)
        if extra is None:
            return
        i, factor, letters_to_collapse = extra
        letters, labeling = placed[i]
        for dim in factor.dims:
            if letters[dim] in letters_to_collapse:
                labeling = ctx.collapse(labeling, dim)
        placed[i] = (letters, labeling)


def _matmul_letters(rank_a: int, rank_b: int) -> tuple[str, str, str]:
    batch = string.ascii_lowercase[:max(rank_a, rank_b) - 2]
    return batch[len(batch) - (rank_a - 2):] + "xy", batch[len(batch) - (rank_b - 2):] + "yz", batch + "xz"


@channel_rule(*_names(("matmul", "bmm", "__matmul__")))
def matmul_rule(ctx: RuleContext) -> None:
    """Matrix products: batch dims coupled, the inner dim contracted."""
    a, b = ctx.tensor_args()[:2]
    rank_a, rank_b = len(ctx.shape(a)), len(ctx.shape(b))
    if min(rank_a, rank_b) < 2:
        for ref in (a, b):
            ctx.block(ctx.labels(ref), "a vector product")
        return
    la, lb, lo = _matmul_letters(rank_a, rank_b)
    contract(ctx, [(a, la), (b, lb)], lo)


@channel_rule("torch.einsum", "torch.functional.einsum")
def einsum_rule(ctx: RuleContext) -> None:
    """``torch.einsum`` without ellipsis: letters couple dims across operands."""
    equation = ctx.arg(0, "equation").replace(" ", "")
    refs = ctx.tensor_args()
    if "..." in equation or "->" not in equation:
        for ref in refs:
            ctx.block(ctx.labels(ref), "einsum with an implicit output or ellipsis")
        return
    inputs, output = equation.split("->")
    contract(ctx, list(zip(refs, inputs.split(","))), output)


@channel_rule(*_names(("linear",)))
def functional_linear_rule(ctx: RuleContext) -> None:
    """``F.linear(x, weight, bias)``: weight rows are output features, columns couple with x's last dim."""
    x, weight, bias = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    rank = len(ctx.shape(x))
    batch = string.ascii_lowercase[:rank - 1]
    operands = [(x, batch + "y"), (weight, "zy")]
    if isinstance(bias, Ref):
        operands.append((bias, "z"))
    contract(ctx, operands, batch + "z")


@channel_rule(*_names(("addmm",)))
def addmm_rule(ctx: RuleContext) -> None:
    """``addmm(bias, x, weight)`` (transformers' ``Conv1D``): x's columns meet weight's rows; bias follows the
    output columns."""
    bias, x, weight = ctx.arg(0, "input"), ctx.arg(1, "mat1"), ctx.arg(2, "mat2")
    operands = [(x, "xy"), (weight, "yz")]
    if isinstance(bias, Ref):
        operands.append((bias, "xz"[-len(ctx.shape(bias)):]))
    contract(ctx, operands, "xz")


@channel_rule(*_names(("scaled_dot_product_attention",)))
def attention_rule(ctx: RuleContext) -> None:
    """Whole heads: q/k/v/output of head h are coupled (with GQA, a key/value head with its query heads)."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    rank = len(ctx.shape(q))
    heads_q, heads_kv = ctx.shape(q)[-3], ctx.shape(k)[-3]
    for ref in (q, k, v):
        labeling = ctx.labels(ref)
        if labeling is not None and labeling.factor_at(rank - 1) is not None and labeling.factor_at(rank - 3):
            ctx.collapse(labeling, rank - 1)
    head = [ctx.along(ref, rank - 3) for ref in (q, k, v)]
    mask = ctx.arg(3, "attn_mask")
    mask_shape = ctx.shape(mask) if isinstance(mask, Ref) else None
    per_head = bool(mask_shape) and len(mask_shape) >= 3 and mask_shape[-3] == heads_q > 1
    mask_heads = ctx.along(mask, len(mask_shape) - 3) if per_head else None
    mask_labels = ctx.labels(mask) if isinstance(mask, Ref) else None
    for factor in mask_labels.factors if mask_labels else ():
        if not per_head or factor.dims != (len(mask_shape) - 3,):
            ctx.block(factor, "attention mask")
    q_heads, k_heads, v_heads = head
    if q_heads is not None and k_heads is not None:
        ctx.record.union(q_heads.reshape(heads_kv, -1), k_heads.reshape(heads_kv, 1))
    if k_heads is not None and v_heads is not None:
        ctx.record.union(k_heads, v_heads)
    if per_head and mask_heads is not None and q_heads is not None:
        ctx.record.union(mask_heads, q_heads)  # a per-head mask (a relative-position bias) loses the pruned heads
    if any(ids is None for ids in head) or (per_head and mask_heads is None):
        for ref in (q, k, v, mask):
            ctx.block(ctx.labels(ref), "attention operand whose heads cannot be pruned")
        return
    for ref in (q, k, v):
        labeling = ctx.labels(ref)
        for factor in labeling.factors if labeling else ():
            if rank - 3 not in factor.dims:
                ctx.block(factor, "attention mixes this dim")
    ctx.set_output(Labeling.single(rank, rank - 3, q_heads))


# ------------------------------------------------------------------ tensors created from sizes
@channel_rule(*_names(("zeros", "ones", "empty", "full", "rand", "randn", "new_zeros", "new_ones", "new_empty",
                       "new_full", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like")))
def creation_rule(ctx: RuleContext) -> None:
    """A uniform tensor whose size along a dim is read from a channel dim carries those channels."""
    out_shape = ctx.out_shape
    rank = len(out_shape)
    op = ctx.node.op.rsplit(".", 1)[-1]
    if op.endswith("_like"):
        ctx.set_output(ctx.labels(ctx.tensor_args()[0]))
        return
    args = ctx.node.args[1:] if op.startswith("new_") else ctx.node.args
    sizes = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    sizes = sizes or ctx.node.kwargs.get("size", ())
    factors = []
    for dim, size in enumerate(list(sizes)[:rank]):
        expr = size.expr if isinstance(size, Sym) else None
        if isinstance(expr, tuple) and expr[0] == "size":
            ids = ctx.along(expr[1], expr[2])
            if ids is not None:
                factors.append(Factor((dim,), ids))
    ctx.set_output(Labeling(rank, tuple(factors)) if factors else None)
