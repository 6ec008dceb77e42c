"""Keep a pruning plan to what the Hugging Face configs inside the model can hold: "prune and give me my model back".

A config holds a pruned size only where its fields count it, alike in every layer they describe. Many channel
groups have no such field: the value projection's channels inside a head, heads of a model that derives its head
size from the hidden size (GPT-2, BERT, Falcon's per-head interleaved qkv rows), an MLP width fixed at four times
the hidden size when the hidden size stays (Falcon). Others fit only together: a stage's residual width and its MLP,
both scaled by ``hidden_sizes[i]`` (ConvNeXt). :func:`config_expressible_plan` keeps the groups that can be written
back with ``save_pretrained`` / ``from_pretrained`` round-tripping and leaves out the others, saying why.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, Mapping

import networkx as nx
import numpy as np
import torch.nn as nn

from .config_fit import ConfigFitter, Field, Shapes, is_config, is_pretrained_model, sub_configs
from .dependency import ChannelGroup
from .errors import PruningError
from .modules import ParameterNode
from .pruning import _removed_mask, dependency_graph
from .write_back import apply_plan, model_submodule, named_tensors, node_sources, within

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


def config_expressible_plan(model: nn.Module, rnet, plan: Mapping[Any, Iterable[int]], root: str = "",
                            inputs: tuple[tuple, dict] | None = None, verify: bool = True,
                            rtol: float = 1e-5) -> ConfigPlan:
    """The part of ``plan`` that :func:`graph.write_back.apply_plan` can write into ``model`` with every Hugging Face
    config inside it refitted, so each ``PreTrainedModel`` reloads with ``from_pretrained``.

    ``rnet`` was captured from ``model.get_submodule(root)`` and ``plan`` maps its channel groups (or their ids) to
    removed indices (e.g. ``plan_by_ratio(rnet, 0.5)``). The same group in every layer is one *kind*; a kind that
    shrinks a dim no config field scales is left out at once. Kinds that change a common field (a stage's residual
    width and its MLP width, both scaled by ``hidden_sizes[i]``) are tried together, beside what was kept before;
    if the configs cannot hold them together, each kind is tried alone: as requested, else with every layer trimmed
    to the smallest count of its kind, else left out with the config's reason in ``excluded``.

    Shapes alone do not show every size a forward derives (an attention scale from a head size that pruned head
    channels changed): with ``verify`` the kept plan is written back once (on ``inputs``, to ``rtol``, as
    :func:`apply_plan` checks it) and, if the copy differs from the pruned network, what was kept is written back
    again one part at a time, leaving out the parts whose copy fails. Groups that touch no Hugging Face model are
    kept when they pass that check. ``model`` is not changed.
    """
    graph = dependency_graph(rnet)
    by_id = {g.id: g for g in graph.groups}
    requested = {}
    for key, indices in plan.items():
        group = by_id.get(key.id if isinstance(key, ChannelGroup) else key)
        if group is None or (isinstance(key, ChannelGroup) and group is not key):
            raise PruningError(f"{key!r} is not a channel group of this network (take groups from its "
                               "channel_groups())")
        requested[group] = list(indices)
    fit = _PlanFit(_Tensors(model, model_submodule(model, root), rnet, root), graph)
    units: list[dict[ChannelGroup, list[int]]] = []
    excluded: dict[ChannelGroup, str] = {}
    fields: list[tuple[list[ChannelGroup], set]] = []
    for kind in _kinds(requested):
        touched = fit.fields({g: requested[g] for g in kind})
        if isinstance(touched, str):
            excluded.update((g, touched) for g in kind)
        else:
            fields.append((kind, touched))
    for component in _components(fields):
        kept = {g: i for unit in units for g, i in unit.items()}
        together = {g: requested[g] for kind in component for g in kind}
        if fit.misfit({**kept, **together}) is None:
            units.append(together)
            continue
        for kind in component:
            candidate, reason = _fit_kind(fit, {g: i for unit in units for g, i in unit.items()},
                                          {g: requested[g] for g in kind})
            if reason is None:
                units.append(candidate)
            else:
                excluded.update((g, reason) for g in kind)
    if verify:
        units = _written_back(units, excluded, lambda p: apply_plan(model, rnet, p, root, inputs, rtol))
    kept = {g: i for unit in units for g, i in unit.items()}
    trimmed = {g: len(requested[g]) for g in kept if len(kept[g]) != len(requested[g])}
    return ConfigPlan({g: kept[g] for g in requested if g in kept}, excluded, trimmed)


def _written_back(units: list[dict], excluded: dict, write: Callable[[dict], Any]) -> list[dict]:
    """The units whose write-back verifies: all at once if they do, else one at a time beside those kept before
    (the others go to ``excluded`` with the verification error)."""
    try:
        write({g: i for unit in units for g, i in unit.items()})
        return units
    except PruningError:
        pass
    kept: list[dict] = []
    for unit in units:
        try:
            write({g: i for part in kept + [unit] for g, i in part.items()})
            kept.append(unit)
        except PruningError as error:
            excluded.update((g, f"written back: {error}") for g in unit)
    return kept


def _kinds(plan: dict[ChannelGroup, list[int]]) -> list[list[ChannelGroup]]:
    """The plan's groups by kind: same size and same members up to layer indices (``layers.3`` ~ ``layers.7``)."""
    kinds: dict[tuple, list[ChannelGroup]] = defaultdict(list)
    for group in plan:
        if plan[group]:
            kinds[(group.size, frozenset((_LAYER_INDEX.sub("#", m.node), m.tensor, m.dim, m.positions.shape[1])
                                         for m in group.members))].append(group)
    return list(kinds.values())


def _components(kinds: list[tuple[list[ChannelGroup], set]]) -> list[list[list[ChannelGroup]]]:
    """Kinds linked through the config fields they change (a stage's residual width and its MLP, both scaled by
    ``hidden_sizes[i]``), each component in the order of its first kind."""
    graph = nx.Graph()
    for index, (_, touched) in enumerate(kinds):
        graph.add_node(("kind", index))
        graph.add_edges_from((("kind", index), ("field", field)) for field in touched)
    components = [sorted(i for kind, i in component if kind == "kind") for component in nx.connected_components(graph)]
    return [[kinds[i][0] for i in component] for component in sorted(c for c in components if c)]


def _fit_kind(fit: "_PlanFit", kept: dict, candidate: dict) -> tuple[dict, str | None]:
    """``candidate`` (one kind) as the configs can hold it beside ``kept``: as requested, else with every layer
    trimmed to the smallest count of the kind; the config's reason when neither fits."""
    reason = fit.misfit({**kept, **candidate})
    if reason is None:
        return candidate, None
    count = min(len(indices) for indices in candidate.values())
    even = {g: indices[:count] for g, indices in candidate.items()}
    if even != candidate and count and fit.misfit({**kept, **even}) is None:
        return even, None
    return candidate, reason


class _PlanFit:
    """Shapes a plan gives each Hugging Face model, and whether (and with which fields) its config holds them."""

    def __init__(self, tensors: "_Tensors", graph):
        self.tensors, self.graph = tensors, graph
        self.fitters: dict[str, ConfigFitter] = {}

    def _pruned(self, plan: dict) -> Iterator[tuple[str, ConfigFitter, Shapes]]:
        """``(owner, fitter, pruned shapes)`` for every Hugging Face model whose tensors ``plan`` shrinks."""
        shrunk = self.tensors.shrunk(self.graph, plan)
        for owner, module in self.tensors.owners.items():
            state = module.state_dict(keep_vars=True)
            if not any(id(t) in shrunk for t in state.values()):
                continue
            if owner not in self.fitters:
                self.fitters[owner] = ConfigFitter(module)
            yield owner, self.fitters[owner], {name: tuple(shrunk.get(id(t), {}).get(d, size)
                                                           for d, size in enumerate(t.shape))
                                               for name, t in state.items()}

    def misfit(self, plan: dict) -> str | None:
        """Why the configs cannot hold ``plan`` (the first config's error), or ``None`` when all of them can."""
        owner = ""
        try:
            for owner, fitter, pruned in self._pruned(plan):
                fitter.fit(pruned)
        except PruningError as error:
            return f"{owner or 'the model'}: {error}"
        return None

    def fields(self, plan: dict) -> set[tuple[str, Field]] | str:
        """The ``(owner, field)`` pairs whose values scale a dim ``plan`` shrinks; or why ``plan`` cannot be held at
        all: a module's config nobody refits, a dim no field of the config scales."""
        stale = self.tensors.unfittable(list(plan))
        if stale:
            return stale
        touched: set[tuple[str, Field]] = set()
        owner = ""
        try:
            for owner, fitter, pruned in self._pruned(plan):
                for name, shape in pruned.items():
                    for d in (d for d, size in enumerate(shape) if size != fitter.base[name][d]):
                        scaling = {f for f, dims in fitter.scales.items() if (name, d) in dims}
                        if not scaling:
                            return (f"{owner or 'the model'}: no field of the {fitter.name} holds the size of {name} "
                                    f"(dim {d}), so the config cannot describe it pruned")
                        touched.update((owner, f) for f in scaling)
        except PruningError as error:
            return f"{owner or 'the model'}: {error}"
        return touched


class _Tensors:
    """Where the network's group members sit in the model: each member's model tensor, the Hugging Face models that
    own them (outermost ``PreTrainedModel`` s, by path) and the other modules holding configs nobody refits."""

    def __init__(self, model: nn.Module, sub: nn.Module, rnet, root: str):
        graph = dependency_graph(rnet)
        named = named_tensors(sub)
        sources = {node.name: (path, module) for node, path, module in node_sources(sub, rnet)}
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
            if is_pretrained_model(module) and not any(within(name, owner) for owner in self.owners):
                self.owners[name] = module
        refitted = {id(c) for module in self.owners.values() for c in sub_configs(module.config)}
        self.stale = {name: module for name, module in model.named_modules()
                      if is_config(getattr(module, "config", None)) and id(module.config) not in refitted
                      and not any(within(name, owner) for owner in self.owners)}

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
            if any(within(path, holder) for path in paths):
                return (f"{holder or 'the model'} ({type(module).__name__}) holds a {type(module.config).__name__} "
                        "that apply_plan cannot refit")
        return None
