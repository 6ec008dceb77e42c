"""Keep a pruning plan to what the Hugging Face configs inside the model can hold: "prune and give me my model back".

A config holds a pruned size only where one of its fields counts it, alike in every layer it describes. Many
channel groups have no such field: the value projection's channels inside a head (no field counts them), heads of
a model that derives its head size from the hidden size (GPT-2, BERT, GPT-NeoX's fused qkv), an MLP width fixed as a
multiple of the hidden size (ConvNeXt). :func:`config_expressible_plan` keeps the groups that can be written back
with ``save_pretrained`` / ``from_pretrained`` round-tripping and leaves out the others, saying why.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterable, Mapping

import numpy as np
import torch.nn as nn

from .config_fit import ConfigFitter, is_config, is_pretrained_model, sub_configs
from .dependency import ChannelGroup
from .errors import PruningError
from .modules import ParameterNode
from .pruning import _removed_mask, dependency_graph
from .write_back import _node_sources, _submodule, _within

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


class ConfigPlan(dict):
    """A plan (``{group: indices}``, usable wherever a plan is) restricted to what the model's configs can hold.

    ``excluded`` maps every group of the requested plan that was left out to the reason (the config error, or which
    module's config cannot be refitted); ``trimmed`` maps a group to its requested number of removed channels where
    fewer were kept in the plan so that every layer of its kind removes the same number (the first indices listed
    are kept: :func:`graph.pruning.plan_by_ratio` lists the least important first).
    """

    def __init__(self, plan: Mapping[ChannelGroup, list[int]], excluded: dict[ChannelGroup, str],
                 trimmed: dict[ChannelGroup, int]):
        super().__init__(plan)
        self.excluded, self.trimmed = excluded, trimmed

    def reasons(self) -> dict[str, list[int]]:
        """Each distinct exclusion reason -> the ids of the groups it left out."""
        grouped: dict[str, list[int]] = defaultdict(list)
        for group, reason in self.excluded.items():
            grouped[reason].append(group.id)
        return dict(grouped)


def config_expressible_plan(model: nn.Module, rnet, plan: Mapping[Any, Iterable[int]], root: str = "") -> ConfigPlan:
    """The part of ``plan`` that :func:`graph.write_back.apply_plan` can write into ``model`` with every Hugging Face
    config inside it refitted, so each ``PreTrainedModel`` reloads with ``from_pretrained``.

    ``rnet`` was captured from ``model.get_submodule(root)`` and ``plan`` maps its channel groups (or their ids) to
    removed indices (e.g. ``plan_by_ratio(rnet, 0.5)``). Groups are tried kind by kind (the same group in every
    layer is one kind): a kind is kept when the configs can hold it together with the kinds kept before it, else
    kept with every layer trimmed to the smallest count of its kind if that fits, else left out with the reason in
    ``excluded``. Groups that touch no Hugging Face model are kept as they are. ``model`` is not changed.
    """
    sub = _submodule(model, root)
    graph = dependency_graph(rnet)
    by_id = {g.id: g for g in graph.groups}
    requested = {by_id[key.id if isinstance(key, ChannelGroup) else key]: list(indices)
                 for key, indices in plan.items()}
    tensors = _Tensors(model, sub, rnet, root)
    fitters: dict[str, ConfigFitter] = {}
    kept: dict[ChannelGroup, list[int]] = {}
    excluded: dict[ChannelGroup, str] = {}
    trimmed: dict[ChannelGroup, int] = {}
    for kind in _kinds(requested):
        stale = tensors.unfittable(kind)
        if stale:
            excluded.update((g, stale) for g in kind)
            continue
        candidate = {g: requested[g] for g in kind}
        reason = _misfit(tensors, fitters, graph, {**kept, **candidate})
        if reason is not None:
            count = min(len(indices) for indices in candidate.values())
            even = {g: indices[:count] for g, indices in candidate.items()}
            if even != candidate and count and _misfit(tensors, fitters, graph, {**kept, **even}) is None:
                trimmed.update((g, len(requested[g])) for g in kind if len(requested[g]) != count)
                candidate, reason = even, None
        if reason is None:
            kept.update(candidate)
        else:
            excluded.update((g, reason) for g in kind)
    return ConfigPlan({g: kept[g] for g in requested if g in kept}, excluded, trimmed)


def _kinds(plan: dict[ChannelGroup, list[int]]) -> list[list[ChannelGroup]]:
    """The plan's groups by kind: same size and same members up to layer indices (``layers.3`` ~ ``layers.7``)."""
    kinds: dict[tuple, list[ChannelGroup]] = defaultdict(list)
    for group in plan:
        if plan[group]:
            kinds[(group.size, frozenset((_LAYER_INDEX.sub("#", m.node), m.tensor, m.dim, m.positions.shape[1])
                                         for m in group.members))].append(group)
    return list(kinds.values())


def _misfit(tensors: "_Tensors", fitters: dict[str, ConfigFitter], graph, plan: dict) -> str | None:
    """Why the configs cannot hold ``plan`` (the first config's error), or ``None`` when all of them can."""
    shrunk = tensors.shrunk(graph, plan)
    for owner, module in tensors.owners.items():
        state = module.state_dict(keep_vars=True)
        if not any(id(t) in shrunk for t in state.values()):
            continue
        pruned = {name: tuple(shrunk.get(id(t), {}).get(d, size) for d, size in enumerate(t.shape))
                  for name, t in state.items()}
        try:
            if owner not in fitters:
                fitters[owner] = ConfigFitter(module)
            fitters[owner].fit(pruned)
        except PruningError as error:
            return f"{owner or 'the model'}: {error}"
    return None


class _Tensors:
    """Where the network's group members sit in the model: each member's model tensor, the Hugging Face models that
    own them (outermost ``PreTrainedModel`` s, by path) and the other modules holding configs nobody refits."""

    def __init__(self, model: nn.Module, sub: nn.Module, rnet, root: str):
        graph = dependency_graph(rnet)
        named = {**dict(sub.named_parameters(remove_duplicate=False)), **dict(sub.named_buffers(remove_duplicate=False))}
        sources = {node.name: (path, module) for node, path, module in _node_sources(sub, rnet)}
        prefix = f"{root}." if root else ""
        self.paths: dict[tuple[str, str], str] = {}
        self.member_tensors: list[tuple[Any, Any]] = []
        for member in graph.members:
            name = rnet.graph_nodes[member.node].name
            path, module = sources.get(name, (None, None))
            path = path if path is None or isinstance(module, ParameterNode) else f"{path}.{member.tensor}"
            if path in named:
                self.paths[name, member.tensor] = prefix + path
                self.member_tensors.append((member, named[path]))
        self.owners: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            if is_pretrained_model(module) and not any(_within(name, owner) for owner in self.owners):
                self.owners[name] = module
        refitted = {id(c) for module in self.owners.values() for c in sub_configs(module.config)}
        self.stale = {name: module for name, module in model.named_modules()
                      if is_config(getattr(module, "config", None)) and id(module.config) not in refitted
                      and not any(_within(name, owner) for owner in self.owners)}

    def shrunk(self, graph, plan: dict) -> dict[int, dict[int, int]]:
        """``id`` of each model tensor the plan shrinks -> ``{dim: new size}``."""
        gone = _removed_mask(graph, plan)
        new: dict[int, dict[int, int]] = defaultdict(dict)
        for member, tensor in self.member_tensors:
            keep = ~gone[graph.component[np.asarray(member.ids)]]
            if not keep.all():
                new[id(tensor)][member.dim] = int(keep.sum())
        return new

    def unfittable(self, kind: list[ChannelGroup]) -> str | None:
        """Why ``kind`` cannot be written back: it shrinks a tensor of a module outside every Hugging Face model that
        holds a config apply_plan cannot refit; else ``None``."""
        paths = {self.paths.get((m.node, m.tensor)) for g in kind for m in g.members} - {None}
        for holder, module in self.stale.items():
            if any(_within(path, holder) for path in paths):
                return (f"{holder or 'the model'} ({type(module).__name__}) holds a {type(module.config).__name__} "
                        "that apply_plan cannot refit")
        return None
