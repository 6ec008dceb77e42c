"""Constructor arguments of leaf modules, read off a module so that a file can rebuild it by calling its class.

Most leaf types keep each constructor argument in an attribute of the same name (``Conv2d.in_channels``,
``MaxPool2d.kernel_size``), so the arguments are read generically from ``inspect.signature(cls.__init__)``. Types
whose attributes differ register a small reader for those arguments only. Sizes come from the attributes, so a
channel-pruned module (attributes and weights shrunk together) rebuilds at its new size; :func:`shape_mismatches`
checks that the rebuilt module's tensors have the shapes of the stored ones.
"""
from __future__ import annotations

import inspect
import types
import typing
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn as nn

from ..registry import registers_in
from .validation import brief

ArgumentReader = Callable[[nn.Module], dict[str, Any]]
_READERS: dict[type[nn.Module], ArgumentReader] = {}
_NOT_ARGUMENTS = frozenset({"self", "device", "dtype"})
# ``@reads_arguments(*types)``: a function giving the constructor arguments of ``types`` that have no same-named
# attribute on the module (the others are still read generically).
reads_arguments = registers_in(_READERS)


@lru_cache(maxsize=None)
def constructor_arguments(cls: type[nn.Module]) -> tuple[str, ...]:
    """Names of the keyword arguments of ``cls.__init__`` that define the module (no device/dtype/private ones)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return tuple(p.name for p in parameters if p.name not in _NOT_ARGUMENTS and not p.name.startswith("_")
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def leaf_config(module: nn.Module, cls: type[nn.Module]) -> dict[str, Any]:
    """The keyword arguments that rebuild ``module`` as ``cls(**config)``; raises ``TypeError`` if one is unknown."""
    special = _READERS.get(cls, _no_special_arguments)(module)
    config: dict[str, Any] = {}
    for name in constructor_arguments(cls):
        if name in special:
            config[name] = special[name]
            continue
        if not hasattr(module, name):
            raise TypeError(f"cannot read constructor argument {name!r} of {cls.__name__}: the module has no "
                            "attribute of that name (register a reader in graph.serialization.leaf_configs)")
        value = getattr(module, name)
        if isinstance(value, (torch.Tensor, nn.Module)):
            raise TypeError(f"constructor argument {name!r} of {cls.__name__} is not a plain value on the module "
                            "(register a reader in graph.serialization.leaf_configs)")
        config[name] = value
    return config


def build_leaf(cls: type[nn.Module], config: dict[str, Any]) -> nn.Module:
    """``cls(**config)`` on the ``meta`` device: no memory and no initialisation cost until tensors are assigned."""
    with torch.device("meta"):
        return cls(**config)


def shape_mismatches(expected: nn.Module, actual: dict[str, torch.Tensor]) -> list[str]:
    """``name: got vs expected`` for each tensor of ``actual`` whose shape differs from ``expected``'s tensor."""
    own = dict(expected.named_parameters(remove_duplicate=False))
    own.update(expected.named_buffers(remove_duplicate=False))
    problems = []
    for name, tensor in actual.items():
        reference = own.get(name)
        if reference is None:
            problems.append(f"{name}: not a tensor of {type(expected).__name__} built from its arguments")
        elif tuple(reference.shape) != tuple(tensor.shape):
            problems.append(f"{name}: {tuple(tensor.shape)} but the arguments give {tuple(reference.shape)}")
    problems.extend(f"{name}: missing" for name in own.keys() - actual.keys())
    return problems


def _no_special_arguments(module: nn.Module) -> dict[str, Any]:
    return {}


@reads_arguments(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.Linear, nn.Bilinear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
                 nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _bias_flag(module: nn.Module) -> dict[str, Any]:
    return {"bias": module.bias is not None}


@reads_arguments(nn.SyncBatchNorm)
def _sync_batch_norm(module: nn.Module) -> dict[str, Any]:
    return {"bias": module.bias is not None, "process_group": None}


@reads_arguments(nn.MultiheadAttention)
def _multihead_attention(module: nn.Module) -> dict[str, Any]:
    return {"bias": module.out_proj.bias is not None, "add_bias_kv": module.bias_k is not None}


@reads_arguments(nn.Hardtanh)
def _hardtanh(module: nn.Module) -> dict[str, Any]:
    return {"min_value": None, "max_value": None}


# ------------------------------------------------------------------------------------------------ checking on load
ConfigCheck = Callable[[dict[str, Any]], str | None]
_CONSTRAINTS: dict[type[nn.Module], ConfigCheck] = {}
# ``@constrains(*types)``: a function returning what is wrong with a config whose values have the right types (sizes
# that must divide each other, an index that must lie in range), or ``None``; run before the constructor is called.
constrains = registers_in(_CONSTRAINTS)
_MAX_ARGUMENT = 2**31
_POSITIVE = frozenset({
    "in_channels", "out_channels", "in_features", "out_features", "in1_features", "in2_features", "num_features",
    "num_channels", "num_groups", "embed_dim", "num_heads", "num_embeddings", "embedding_dim", "num_parameters",
    "upscale_factor", "downscale_factor", "groups", "kdim", "vdim", "kernel_size", "stride", "dilation", "size"})
_NON_NEGATIVE = frozenset({"padding", "output_padding"})


@lru_cache(maxsize=None)
def argument_types(cls: type[nn.Module]) -> dict[str, Any]:
    """The annotated type of each constructor argument; an unannotated one takes the type of its default."""
    hints = typing.get_type_hints(cls.__init__)
    parameters = inspect.signature(cls.__init__).parameters
    annotations = {}
    for name in constructor_arguments(cls):
        default = parameters[name].default
        if name in hints:
            annotations[name] = hints[name]
        elif default is inspect.Parameter.empty:
            annotations[name] = int
        else:
            annotations[name] = typing.Optional[int | float | str | bool] if default is None else type(default)
    return annotations


@lru_cache(maxsize=None)
def required_arguments(cls: type[nn.Module]) -> tuple[str, ...]:
    """The constructor arguments without a default value."""
    parameters = inspect.signature(cls.__init__).parameters
    return tuple(n for n in constructor_arguments(cls) if parameters[n].default is inspect.Parameter.empty)


def config_problem(cls: type[nn.Module], config: dict[str, Any]) -> str | None:
    """What is wrong with decoded constructor arguments for ``cls`` (unknown or missing names, a value of the wrong
    type, a size that is not positive, a registered constraint), or ``None`` when ``cls(**config)`` may be called."""
    expected = argument_types(cls)
    unknown = [name for name in config if name not in expected]
    if unknown:
        return f"{unknown[0]!r} is not an argument of {cls.__name__}"
    missing = [name for name in required_arguments(cls) if name not in config]
    if missing:
        return f"missing argument {missing[0]!r}"
    for name, value in config.items():
        if not matches_type(value, expected[name]):
            return f"argument {name}={brief(value)} is not of type {expected[name]}"
        numbers = [v for v in (value if isinstance(value, tuple) else (value,))
                   if isinstance(v, int) and not isinstance(v, bool)]
        if any(abs(v) >= _MAX_ARGUMENT for v in numbers):
            return f"argument {name}={brief(value)} is out of range"
        if name in _POSITIVE and any(v < 1 for v in numbers):
            return f"argument {name}={brief(value)} must be positive"
        if name in _NON_NEGATIVE and any(v < 0 for v in numbers):
            return f"argument {name}={brief(value)} must be non-negative"
    for base in cls.__mro__:
        if base in _CONSTRAINTS:
            return _CONSTRAINTS[base]({**_defaults(cls), **config})
    return None


def matches_type(value: Any, hint: Any) -> bool:
    """True when a decoded JSON value fits a constructor annotation (a tuple stands for a list or ``torch.Size``)."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return value is None or isinstance(value, (bool, int, float, str)) or (
            isinstance(value, tuple) and all(matches_type(v, hint) for v in value))
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, argument) for argument in arguments)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in arguments)
    if origin in (tuple, list) or hint is torch.Size:
        if not isinstance(value, tuple):
            return False
        if origin is tuple and arguments and arguments[-1] is not Ellipsis:
            return len(value) == len(arguments) and all(map(matches_type, value, arguments))
        item = arguments[0] if arguments else int
        return all(matches_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(hint, type) and hint in (bool, str) and isinstance(value, hint)


@lru_cache(maxsize=None)
def _defaults(cls: type[nn.Module]) -> dict[str, Any]:
    parameters = inspect.signature(cls.__init__).parameters
    return {n: parameters[n].default for n in constructor_arguments(cls)
            if parameters[n].default is not inspect.Parameter.empty}


@constrains(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_groups(config: dict[str, Any]) -> str | None:
    if config["in_channels"] % config["groups"] or config["out_channels"] % config["groups"]:
        return f"groups={config['groups']} must divide in_channels and out_channels"
    return None


@constrains(nn.MultiheadAttention)
def _attention_heads(config: dict[str, Any]) -> str | None:
    if config["embed_dim"] % config["num_heads"]:
        return f"num_heads={config['num_heads']} must divide embed_dim={config['embed_dim']}"
    return None


@constrains(nn.GroupNorm)
def _group_norm_groups(config: dict[str, Any]) -> str | None:
    if config["num_channels"] % config["num_groups"]:
        return f"num_groups={config['num_groups']} must divide num_channels={config['num_channels']}"
    return None


@constrains(nn.Embedding, nn.EmbeddingBag)
def _padding_index(config: dict[str, Any]) -> str | None:
    index, count = config.get("padding_idx"), config["num_embeddings"]
    if index is not None and not -count <= index < count:
        return f"padding_idx={index} is outside the {count} embeddings"
    return None
