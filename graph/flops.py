"""Per-node multiply-adds (MACs), other arithmetic and parameters of a ``ReconstructedNetwork``.

:func:`count_flops` runs the network once through ``observe`` and gives every node to the counter registered for its
op (a leaf module type such as ``Conv2d`` or a qualified function name such as ``torch.matmul``), which computes its
cost from the real input and output tensors. Conventions:

- **MACs** are the multiply-accumulates of matmul-like ops only: convolutions and transposed convolutions (groups,
  stride and dilation included), ``Linear``/``Bilinear``, ``matmul``/``mm``/``bmm``/``mv`` and their ``add*``
  forms, ``einsum``, ``scaled_dot_product_attention`` (``QK^T`` and ``AV``) and ``MultiheadAttention``
  (projections and attention). Bias additions are not MACs. This is what ``torch.utils.flop_counter`` counts (its
  FLOPs are twice these MACs).
- **Other ops** counts the remaining arithmetic: one op per *output* element for element-wise maps, activations,
  normalisations, softmax, pooling and resampling (and for the softmax inside attention), and one op per *input*
  element for reductions (``sum``, ``mean``, ``amax`` ...).
- Data movement and creation (views, permutes, indexing, ``cat``, padding, ``arange``, casts), parameter and
  constant nodes, embedding lookups and dropout/stochastic depth (identities at inference) cost nothing.
- Ops with no counter are listed in :attr:`FlopsReport.uncounted` and shown as ``?``; they add nothing to totals.
- **Params** of a node are the parameters of its module (a parameter node counts its tensor when it is an
  ``nn.Parameter``; buffers are not parameters). The total counts every parameter of the network once, even when a
  module or tensor is used by several nodes.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn

from .ir import Node
from .modules import ParameterNode
from .registry import registers_in


class Cost(NamedTuple):
    """The arithmetic of one node: multiply-accumulates of matmul-like work, and other element operations."""

    macs: int = 0
    other: int = 0


class OpCall(NamedTuple):
    """What a counter sees: the node's module and the real arguments and output of its call."""

    module: nn.Module
    args: tuple
    kwargs: dict
    output: Any

    def tensors(self) -> list[torch.Tensor]:
        """The tensor arguments, positional first, then keyword arguments in order."""
        return [value for value in (*self.args, *self.kwargs.values()) if isinstance(value, torch.Tensor)]

    def first_output(self) -> torch.Tensor:
        """The first tensor of the output."""
        return next(iter(_tensors_in(self.output)))


Counter = Callable[[OpCall], Cost]
COUNTERS: dict[str, Counter] = {}
counts = registers_in(COUNTERS)

_F = "torch.nn.functional."


def _names(short: tuple[str, ...], prefixes: tuple[str, ...] = ("torch.", "Tensor.", _F)) -> list[str]:
    """Qualified op names of each short name under each namespace prefix (names that do not exist never match)."""
    return [prefix + name for name in short for prefix in prefixes]


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors_in(item)]
    return []


# ---------------------------------------------------------------------------------------------- matmul-like ops
def _matmul_macs(left: torch.Tensor, right: torch.Tensor, output: torch.Tensor) -> int:
    """``left @ right``: one multiply-accumulate per output element and contracted index."""
    return output.numel() * left.shape[-1]


@counts("Conv1d", "Conv2d", "Conv3d", *_names(("conv1d", "conv2d", "conv3d"), (_F, "torch.")))
def conv(call: OpCall) -> Cost:
    """Convolution: output elements x (input channels / groups) x kernel size (the weight's dims after the first)."""
    weight = getattr(call.module, "weight", None)
    weight = weight if isinstance(weight, torch.Tensor) else call.tensors()[1]
    return Cost(call.first_output().numel() * math.prod(weight.shape[1:]))


@counts("ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
        *_names(("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), (_F, "torch.")))
def conv_transpose(call: OpCall) -> Cost:
    """Transposed convolution: every input element is scattered through (out channels / groups) x kernel size."""
    tensors = call.tensors()
    weight = getattr(call.module, "weight", None)
    weight = weight if isinstance(weight, torch.Tensor) else tensors[1]
    return Cost(tensors[0].numel() * math.prod(weight.shape[1:]))


@counts("Linear", _F + "linear")
def linear(call: OpCall) -> Cost:
    """Linear layer: output elements x input features."""
    weight = getattr(call.module, "weight", None)
    weight = weight if isinstance(weight, torch.Tensor) else call.tensors()[1]
    return Cost(call.first_output().numel() * weight.shape[-1])


@counts("Bilinear", _F + "bilinear")
def bilinear(call: OpCall) -> Cost:
    """Bilinear layer ``x1^T A x2``: output elements x in1 x in2 for ``x1^T A`` plus in2 for the product with x2."""
    first, second = call.tensors()[:2]
    return Cost(call.first_output().numel() * (first.shape[-1] + 1) * second.shape[-1])


@counts(*_names(("matmul", "mm", "bmm", "mv", "inner", "dot", "vdot"), ("torch.", "Tensor.")), "Tensor.__matmul__")
def matmul(call: OpCall) -> Cost:
    """``a @ b`` and its batched/vector forms: output elements x the contracted size."""
    left, right = call.tensors()[:2]
    return Cost(_matmul_macs(left, right, call.first_output()))


@counts("Tensor.__rmatmul__")
def rmatmul(call: OpCall) -> Cost:
    """``other @ self``: as :func:`matmul` with the operands swapped."""
    right, left = call.tensors()[:2]
    return Cost(_matmul_macs(left, right, call.first_output()))


@counts(*_names(("addmm", "baddbmm", "addmv", "addmm_", "baddbmm_", "addmv_"), ("torch.", "Tensor.")))
def add_matmul(call: OpCall) -> Cost:
    """``input + mat1 @ mat2`` (``addmm``, ``baddbmm``, ``addmv``): the product's MACs; the addition is free, as a
    bias is."""
    left, right = call.tensors()[1:3]
    return Cost(_matmul_macs(left, right, call.first_output()))


def _einsum_letters(equation: str, operands: list[torch.Tensor]) -> tuple[list[str], str, dict[str, int]]:
    """Each operand's subscripts and the output's, with ``...`` spelled out as capital letters, and letter sizes."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    ellipsis_rank = max((op.dim() - len(term.replace("...", "")) for term, op in zip(terms, operands)
                         if "..." in term), default=0)
    broadcast = string.ascii_uppercase[:ellipsis_rank]
    sizes: dict[str, int] = {}
    spelled = []
    for term, operand in zip(terms, operands):
        rank = operand.dim() - len(term.replace("...", ""))
        term = term.replace("...", broadcast[ellipsis_rank - rank:])
        spelled.append(term)
        for letter, size in zip(term, operand.shape):
            sizes[letter] = max(sizes.get(letter, 1), size)
    if arrow:
        output = output.replace("...", broadcast)
    else:
        letters = "".join(spelled)
        output = broadcast + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in broadcast))
    return spelled, output, sizes


@counts("torch.einsum")
def einsum(call: OpCall) -> Cost:
    """``einsum``: operands contracted pairwise from the left (torch's order without opt_einsum). A contraction
    costs the product of the sizes of the letters it involves, as MACs when it sums over a letter and as other ops
    when it is a plain element-wise product; letters summed away within one operand are reductions (other ops)."""
    equation = next(value for value in (*call.args, *call.kwargs.values()) if isinstance(value, str))
    terms, output, sizes = _einsum_letters(equation, _tensors_in((call.args, call.kwargs)))

    def size(letters: str) -> int:
        return math.prod(sizes[c] for c in letters)

    macs = other = 0
    current = terms[0]
    for index, term in enumerate(terms[1:], start=1):
        later = set(output).union(*terms[index + 1:])
        operands = []
        for letters, partner in ((current, term), (term, current)):
            kept = "".join(c for c in letters if c in later or c in partner)
            other += size(letters) if kept != letters else 0
            operands.append(kept)
        involved = set(operands[0]) | set(operands[1])
        if involved - later:
            macs += size(involved)
        else:
            other += size(involved)
        current = "".join(sorted(involved & later))
    if len(terms) == 1 and set(current) - set(output):
        other += size(current)
    return Cost(macs, other)


def _attention_cost(batch: int, length: int, source: int, key_dim: int, value_dim: int) -> Cost:
    """Attention of ``batch`` (x heads) groups of ``length`` queries over ``source`` keys: ``QK^T`` and ``AV`` as
    MACs, the softmax over the ``length x source`` scores as other ops."""
    scores = batch * length * source
    return Cost(scores * (key_dim + value_dim), scores)


@counts(_F + "scaled_dot_product_attention")
def scaled_dot_product_attention(call: OpCall) -> Cost:
    """``F.scaled_dot_product_attention``: the MACs of ``QK^T`` and ``AV`` (grouped-query heads included)."""
    query, key, value = call.tensors()[:3]
    return _attention_cost(math.prod(query.shape[:-2]), query.shape[-2], key.shape[-2], query.shape[-1],
                           value.shape[-1])


@counts("MultiheadAttention")
def multihead_attention(call: OpCall) -> Cost:
    """``nn.MultiheadAttention``: query/key/value input projections, per-head attention and the output projection."""
    module = call.module
    query, key, value = call.tensors()[:3]
    batch_first = module.batch_first and query.dim() == 3
    if batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    embed, heads = module.embed_dim, module.num_heads
    length, source = query.shape[0], key.shape[0]
    batch = math.prod(query.shape[1:-1])
    projections = batch * (length * embed * embed + source * module.kdim * embed + source * module.vdim * embed
                           + length * embed * embed)
    attention = _attention_cost(batch * heads, length, source, embed // heads, embed // heads)
    return Cost(projections + attention.macs, attention.other)


# ---------------------------------------------------------------------------------------------- other arithmetic
_ELEMENTWISE_LEAVES = (
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "GroupNorm", "LayerNorm", "RMSNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LocalResponseNorm",
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Hardswish", "Hardsigmoid",
    "Hardtanh", "Sigmoid", "Tanh", "Softplus", "Softsign", "Tanhshrink", "Threshold", "LogSigmoid", "Softmax",
    "LogSoftmax", "Softmax2d", "GLU",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
    "Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d", "EmbeddingBag",
)
_ELEMENTWISE_NAMES = (
    "add", "sub", "mul", "div", "true_divide", "floor_divide", "rsub", "pow", "neg", "abs", "exp", "exp2", "expm1",
    "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "reciprocal", "square", "sin", "cos", "tan", "tanh", "sigmoid",
    "erf", "erfc", "sign", "floor", "ceil", "round", "trunc", "frac", "clamp", "clamp_min", "clamp_max", "clip",
    "maximum", "minimum", "fmod", "remainder", "lerp", "addcmul", "addcdiv", "where", "masked_fill", "nan_to_num",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and",
    "bitwise_or", "bitwise_not", "isnan", "isinf", "isfinite",
    "relu", "relu6", "leaky_relu", "prelu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish",
    "hardsigmoid", "hardtanh", "softplus", "softsign", "tanhshrink", "threshold", "logsigmoid", "glu",
    "softmax", "log_softmax", "softmin", "normalize",
    "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "local_response_norm",
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "grid_sample",
)
_ELEMENTWISE_DUNDERS = (
    "add", "sub", "mul", "truediv", "div", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift",
)


def _elementwise_names() -> list[str]:
    """Every spelling of the element-wise ops: namespaced, in-place (``add_``) and operator (``__add__``) forms."""
    names = _names(_ELEMENTWISE_NAMES) + _names(tuple(n + "_" for n in _ELEMENTWISE_NAMES), ("Tensor.", "torch.", _F))
    for name in _ELEMENTWISE_DUNDERS:
        names += [f"Tensor.__{name}__", f"Tensor.__r{name}__", f"Tensor.__i{name}__"]
    return names + ["Tensor.__neg__", "Tensor.__abs__", "Tensor.__invert__", "Tensor.__eq__", "Tensor.__ne__",
                    "Tensor.__lt__", "Tensor.__le__", "Tensor.__gt__", "Tensor.__ge__"]


@counts(*_ELEMENTWISE_LEAVES, *_elementwise_names())
def elementwise(call: OpCall) -> Cost:
    """Element-wise maps, activations, normalisations, softmax, pooling and resampling: one op per output element."""
    return Cost(0, sum(t.numel() for t in _tensors_in(call.output)))


_REDUCTION_NAMES = ("sum", "mean", "prod", "amax", "amin", "max", "min", "argmax", "argmin", "norm", "var", "std",
                    "var_mean", "std_mean", "logsumexp", "cumsum", "cumprod", "all", "any", "count_nonzero")


@counts(*_names(_REDUCTION_NAMES, ("torch.", "Tensor.", "torch.linalg.")))
def reduction(call: OpCall) -> Cost:
    """Reductions and scans: one op per input element."""
    tensors = call.tensors()
    return Cost(0, tensors[0].numel() if tensors else 0)


_FREE_LEAVES = ("Identity", "Embedding", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
                "StochasticDepth", "PixelShuffle", "PixelUnshuffle", "ChannelShuffle", "Flatten", "Unflatten",
                "ZeroPad1d", "ZeroPad2d", "ZeroPad3d", "ConstantPad1d", "ConstantPad2d", "ConstantPad3d",
                "ReflectionPad1d", "ReflectionPad2d", "ReplicationPad1d", "ReplicationPad2d", "param", "constant",
                "mode_select")
_FREE_NAMES = (
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
    "transpose", "t", "T", "mT", "swapaxes", "movedim", "contiguous", "expand", "expand_as", "repeat",
    "repeat_interleave", "tile", "broadcast_to", "cat", "concat", "concatenate", "stack", "split", "chunk",
    "unbind", "tensor_split", "narrow", "select", "index_select", "gather", "take", "flip", "roll", "__getitem__",
    "__setitem__", "masked_select", "pad", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "embedding",
    "one_hot", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long", "bool", "cpu", "cuda",
    "clone", "detach", "detach_", "requires_grad_", "copy_", "fill_", "zero_", "arange", "zeros", "ones", "full",
    "empty", "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full",
    "new_empty", "new_tensor", "tensor", "as_tensor", "linspace", "tril", "triu", "diag", "diagonal",
    "triu_indices", "tril_indices", "meshgrid", "unfold", "fold",
)


@counts(*_FREE_LEAVES, *_names(_FREE_NAMES))
def free(call: OpCall) -> Cost:
    """Data movement, creation, casts, lookups, parameters and inference-time identities: no arithmetic."""
    return Cost()


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class FlopsRow:
    """One node's line of the report; ``macs``/``other`` are ``None`` when its op has no counter."""

    name: str
    op: str
    shape: str
    params: int
    macs: int | None
    other: int | None


@dataclass
class FlopsReport:
    """Per-node MACs, other ops and parameters in graph order, with totals (see the module docstring)."""

    rows: list[FlopsRow]
    total_params: int
    uncounted: list[str] = field(default_factory=list)

    @property
    def total_macs(self) -> int:
        """Multiply-accumulates of all counted nodes."""
        return sum(row.macs or 0 for row in self.rows)

    @property
    def total_other(self) -> int:
        """Other (element-wise, normalisation, pooling, reduction) ops of all counted nodes."""
        return sum(row.other or 0 for row in self.rows)

    @property
    def by_node(self) -> dict[str, FlopsRow]:
        """The rows keyed by node name."""
        return {row.name: row for row in self.rows}

    def _cells(self) -> tuple[list[str], list[list[str]], list[str]]:
        header = ["node", "op", "output shape", "params", "MACs", "other ops"]
        body = [[row.name, row.op, row.shape, f"{row.params:,}", _number(row.macs), _number(row.other)]
                for row in self.rows]
        total = ["total", "", "", f"{self.total_params:,}", f"{self.total_macs:,}", f"{self.total_other:,}"]
        return header, body, total

    def __str__(self) -> str:
        header, body, total = self._cells()
        lines = [header, *body, total]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

        def render(line: list[str]) -> str:
            return "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths))).rstrip()

        rule = "  ".join("-" * w for w in widths)
        text = [render(header), rule, *map(render, body), rule, render(total)]
        if self.uncounted:
            text.append(f"uncounted ops (shown as ?): {', '.join(self.uncounted)}")
        return "\n".join(text)

    def to_markdown(self) -> str:
        """The table in GitHub markdown, totals in bold as the last row."""
        header, body, total = self._cells()
        lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 3 + ["---:"] * 3) + " |"]
        lines += ["| " + " | ".join(f"`{cell}`" if i < 2 else cell for i, cell in enumerate(row)) + " |"
                  for row in body]
        lines.append("| " + " | ".join(f"**{cell}**" if cell else "" for cell in total) + " |")
        if self.uncounted:
            lines.append(f"\nUncounted ops: {', '.join(self.uncounted)}")
        return "\n".join(lines) + "\n"


def _number(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _shape_text(output: Any) -> str:
    shapes = ["x".join(map(str, t.shape)) or "scalar" for t in _tensors_in(output)]
    return shapes[0] if len(shapes) == 1 else "(" + ", ".join(shapes) + ")"


def _node_params(module: nn.Module) -> int:
    if isinstance(module, ParameterNode):
        return module.value.numel() if isinstance(module.value, nn.Parameter) else 0
    return sum(p.numel() for p in module.parameters())


def count_flops(rnet, *inputs: Any, **kwargs: Any) -> FlopsReport:
    """Run ``rnet`` once (on ``inputs``/``kwargs``, else on ``rnet.example_inputs()`` at the captured size) under
    ``torch.no_grad`` and count every node's MACs, other ops and parameters with the counters in ``COUNTERS``."""
    if not inputs and not kwargs:
        inputs, kwargs = rnet.example_inputs()
    rows: list[FlopsRow] = []
    uncounted: dict[str, None] = {}

    def observe(node: Node, args: tuple, call_kwargs: dict, output: Any) -> None:
        module = rnet.module_of(node)
        counter = COUNTERS.get(node.op)
        cost = None
        if counter is None:
            uncounted.setdefault(node.op, None)
        else:
            try:
                cost = counter(OpCall(module, args, call_kwargs, output))
            except (IndexError, StopIteration, ValueError, AttributeError) as error:
                raise ValueError(f"cannot count the FLOPs of {node.describe()}: {error!r}") from error
        rows.append(FlopsRow(node.name, node.op, _shape_text(output), _node_params(module),
                             None if cost is None else cost.macs, None if cost is None else cost.other))

    with torch.no_grad():
        rnet.observe(observe, *inputs, **kwargs)
    total_params = sum(p.numel() for p in rnet.parameters())
    return FlopsReport(rows, total_params, list(uncounted))
