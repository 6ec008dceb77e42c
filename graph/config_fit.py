"""Fit a Hugging Face config's size fields to the tensor shapes of a pruned model.

A *field* is a path into the config: ``("intermediate_size",)``, ``("hidden_sizes", 2)`` for one entry of a
per-stage (or per-layer) list, ``("text_config", "hidden_size")`` inside a sub-config. :class:`ConfigFitter` measures
which tensor dims each field scales by building the model on the meta device with that field doubled, then solves
the pruned shapes for new field values and checks that a model built from them has exactly the pruned shapes.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator

import torch
import torch.nn as nn

from .errors import PruningError

Field = tuple
Shapes = dict[str, tuple[int, ...]]

# Config fields that channel pruning can change, int or a list of ints (one per stage or layer); aliases such as
# GPT-2's ``n_head`` resolve through the config's ``attribute_map``. ``head_dim`` is not one of them: pruning removes
# whole heads.
CONFIG_SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "n_inner",
                      "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "encoder_attention_heads",
                      "decoder_attention_heads", "moe_intermediate_size", "shared_expert_intermediate_size",
                      "hidden_sizes", "neck_hidden_sizes", "embed_dim", "embed_dims", "embedding_size", "num_heads")
CONFIG_CLASS_NAMES = ("PretrainedConfig", "PreTrainedConfig")


def is_config(value: Any) -> bool:
    """True for a Hugging Face configuration object (an instance of transformers' ``PreTrainedConfig``)."""
    return any(cls.__name__ in CONFIG_CLASS_NAMES for cls in type(value).__mro__)


def is_pretrained_model(module: nn.Module) -> bool:
    """True for a Hugging Face model (an instance of transformers' ``PreTrainedModel``) holding a config."""
    return any(cls.__name__ == "PreTrainedModel" for cls in type(module).__mro__) and is_config(
        getattr(module, "config", None))


def sub_configs(config) -> Iterator[Any]:
    """The config and every configuration nested in it (``text_config``, ``vision_config``, ``encoder`` ...)."""
    yield config
    for value in vars(config).values():
        if is_config(value):
            yield from sub_configs(value)


def get_field(config, field: Field) -> Any:
    """The value at ``field`` (attribute names and list indices) in ``config``."""
    value = config
    for part in field:
        value = value[part] if isinstance(part, int) else getattr(value, part)
    return value


def set_field(config, field: Field, value: int) -> None:
    """Set ``field`` of ``config`` to ``value``; a list entry is set in a new list of the same type."""
    owner = get_field(config, field[:-2] if isinstance(field[-1], int) else field[:-1])
    if isinstance(field[-1], int):
        items = list(getattr(owner, field[-2]))
        items[field[-1]] = value
        setattr(owner, field[-2], type(getattr(owner, field[-2]))(items))
    else:
        setattr(owner, field[-1], value)


def size_fields(config, prefix: Field = ()) -> list[Field]:
    """The config's size fields: int fields and each entry of int-list fields of :data:`CONFIG_SIZE_FIELDS` (by
    their real attribute names), then those of its sub-configs."""
    fields: list[Field] = []
    for name in dict.fromkeys(config.attribute_map.get(f, f) for f in CONFIG_SIZE_FIELDS):
        value = vars(config).get(name)
        if type(value) is int and value > 0:
            fields.append(prefix + (name,))
        elif isinstance(value, (list, tuple)) and value and all(type(v) is int and v > 0 for v in value):
            fields.extend(prefix + (name, i) for i in range(len(value)))
    for name, value in vars(config).items():
        if is_config(value):
            fields.extend(size_fields(value, prefix + (name,)))
    return fields


def pin_head_dim(config) -> None:
    """Write the head size into every (sub-)config that derives it (``hidden_size // num_attention_heads``), so models
    that read ``config.head_dim`` keep it when heads are pruned; the value is the one the model already uses."""
    for part in sub_configs(config):
        heads, hidden = getattr(part, "num_attention_heads", None), getattr(part, "hidden_size", None)
        if type(getattr(part, "head_dim", None)) is not int and type(heads) is int and type(hidden) is int and heads:
            part.head_dim = hidden // heads


def describe_field(field: Field) -> str:
    """``text_config.hidden_sizes[2]`` for ``("text_config", "hidden_sizes", 2)``."""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(field))


class ConfigFitter:
    """The size fields of one Hugging Face model's config and the tensor dims each scales.

    ``model`` is a ``PreTrainedModel``, rebuilt on the meta device as ``type(model)(config)``; the fitter works on a
    copy of its config (with the head size pinned, :func:`pin_head_dim`) and never changes the model.
    """

    def __init__(self, model: nn.Module):
        self.model_class = type(model)
        self.config = copy.deepcopy(model.config)
        pin_head_dim(self.config)
        self.name = type(self.config).__name__
        try:
            self.before = self.build(self.config)
        except Exception as error:
            raise PruningError(f"{self.model_class.__name__} cannot be rebuilt from its {self.name} to fit the "
                               f"pruned sizes ({error}); pass fit_config=False to keep the config as it is") from error
        self.base = shapes_of(self.before)
        self.scales = self._measure_scales()

    def build(self, config) -> nn.Module:
        """The model built from ``config`` on the meta device (no memory, no initialisation cost)."""
        with torch.device("meta"):
            return self.model_class(config)

    def _measure_scales(self) -> dict[Field, dict[tuple[str, int], float]]:
        """Per field, ``(tensor, dim) -> growth of that dim per unit of the field``, from a build with it doubled."""
        scales = {}
        for field in size_fields(self.config):
            doubled = copy.deepcopy(self.config)
            set_field(doubled, field, 2 * get_field(self.config, field))
            try:
                shapes = shapes_of(self.build(doubled))
            except Exception:  # this value is not a valid configuration: the field is not fitted
                continue
            if shapes.keys() != self.base.keys():
                continue
            value = get_field(self.config, field)
            scales[field] = {(name, d): (shapes[name][d] - size) / value for name, shape in self.base.items()
                             for d, size in enumerate(shape) if shapes[name][d] != size}
        return scales

    def fit(self, pruned: Shapes) -> dict[Field, int]:
        """The fields whose values change, with new values under which the model has exactly the ``pruned`` shapes
        (keyed like the model's ``state_dict``); else :class:`PruningError` saying which field cannot hold them."""
        known: dict[Field, float] = {}
        while True:  # fields read off dims they alone scale first, then dims whose other fields are already known
            found = {field: implied for field in self.scales if field not in known
                     if (implied := self._implied_values(field, known, pruned))}
            if not found:
                break
            for field, implied in found.items():
                known[field] = self._one_value(field, implied)
        fields = {field: int(value) for field, value in known.items() if value != get_field(self.config, field)}
        self._check(fields, pruned)
        return fields

    def _implied_values(self, field: Field, known: dict[Field, float], pruned: Shapes) -> dict:
        """``value -> (tensor, dim)`` for each value of ``field`` that a pruned dim implies, over the dims every other
        field scaling them is known for (each dim's size is affine in the fields, as the doubled builds measured)."""
        implied: dict[float, tuple[str, int]] = {}
        current = get_field(self.config, field)
        for (name, d), scale in self.scales[field].items():
            others = [other for other in self.scales if other != field and (name, d) in self.scales[other]]
            if name not in pruned or any(other not in known for other in others):
                continue
            rest = sum(self.scales[other][name, d] * (known[other] - get_field(self.config, other)) for other in others)
            implied.setdefault(current + (pruned[name][d] - self.base[name][d] - rest) / scale, (name, d))
        return implied

    def _one_value(self, field: Field, implied: dict[float, tuple[str, int]]) -> float:
        """The single whole value all dims agree on for ``field``, else a :class:`PruningError` naming two that
        differ."""
        label = describe_field(field)
        if len(implied) > 1:
            (a, (name_a, dim_a)), (b, (name_b, dim_b)) = list(implied.items())[:2]
            raise PruningError(
                f"the {self.name} cannot hold the pruned sizes: {label} would be {a:g} for {name_a} (dim {dim_a}) but "
                f"{b:g} for {name_b} (dim {dim_b}). A config cannot hold sizes that differ between layers, nor pruned "
                "heads in a model that derives its head size from its hidden size (GPT-2, BERT): prune every layer "
                "alike, leave such heads unpruned (graph.config_plan.config_expressible_plan picks what the config "
                "can hold), or pass fit_config=False to keep the config as it is")
        value, (name, d) = next(iter(implied.items()))
        if value != int(value) or value < 1:
            raise PruningError(f"the {self.name} cannot hold the pruned sizes: {name} (dim {d}) would need "
                               f"{label} = {value:g}")
        return value

    def _check(self, fields: dict[Field, int], pruned: Shapes) -> None:
        """Build the model with ``fields`` set and require every tensor to have its pruned shape."""
        config = copy.deepcopy(self.config)
        for field, value in fields.items():
            set_field(config, field, value)
        try:
            after = shapes_of(self.build(config))
        except Exception as error:
            raise PruningError(f"the {self.name} cannot hold the pruned sizes: with "
                               f"{self._changes(fields) or 'no field changed'} the model cannot be built ({error})"
                               ) from error
        for name, shape in after.items():
            if pruned.get(name, shape) != shape:
                raise PruningError(
                    f"the {self.name} cannot hold the pruned sizes: with {self._changes(fields) or 'no field changed'}"
                    f" {name} would have shape {shape}, the pruned model has {pruned[name]}. No field of the config "
                    "holds this size (a value-only part of a head, an MLP width fixed as a multiple of the hidden "
                    "size), or sizes differ between layers, or heads were pruned in a model whose head size is "
                    "derived from its hidden size; prune every layer alike, keep the plan to what the config can "
                    "hold (graph.config_plan.config_expressible_plan), or pass fit_config=False")

    def _changes(self, fields: dict[Field, int]) -> dict[str, tuple[int, int]]:
        return {describe_field(f): (get_field(self.config, f), v) for f, v in fields.items()}


def shapes_of(model: nn.Module) -> Shapes:
    """``state_dict`` key -> shape."""
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
