"""The dependency graph: run every node's channel rule once, resolve couplings, and group coupled channels."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..ir import Ref
from .context import Member, RuleContext, SizeArg
from .labels import ElementRecord, Labeling
from .registry import find_rule


@dataclass
class GroupMember:
    """One tensor dim of a group: channel ``i`` of the group occupies ``positions[i]`` along ``dim``."""

    node: str
    tensor: str
    dim: int
    role: str
    positions: list[np.ndarray]


@dataclass(eq=False)
class ChannelGroup:
    """A set of coupled channels: removing channel ``i`` removes ``positions[i]`` from every member.

    ``prunable`` is False when a channel reaches the network's inputs or outputs or passes an op with no rule
    (``reason`` says which); ``exact`` is False when removal changes other values (normalisation over channels).
    """

    id: int
    size: int
    members: list[GroupMember]
    prunable: bool
    exact: bool
    reason: str | None
    components: np.ndarray = field(repr=False)

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def nodes(self) -> list[str]:
        """Names of the nodes this group touches."""
        return list(dict.fromkeys(m.node for m in self.members))

    def describe(self) -> str:
        """One line: id, size, flags and the members' nodes."""
        flags = ("prunable" if self.prunable else f"fixed: {self.reason}") + ("" if self.exact else ", inexact")
        return f"group {self.id}: {self.size} channels, {flags}; " + ", ".join(
            f"{m.node}.{m.tensor}[{m.dim}]" for m in self.members)


class DependencyGraph:
    """Channel couplings of a :class:`~graph.network.ReconstructedNetwork`, built once and queried."""

    def __init__(self, rnet):
        self.rnet = rnet
        self.record = ElementRecord()
        self.values: dict[tuple[int, tuple], Labeling] = {}
        self.members: list[Member] = []
        self.size_args: list[SizeArg] = []
        self.rewrites: list[tuple[int, Any]] = []
        self.unsupported: dict[str, str] = {}
        for index, node in enumerate(rnet.graph_nodes):
            module = rnet.nodes[node.key] if node.key else None
            context = RuleContext(self, index, node, module)
            rule = find_rule(node, module)
            if rule is None:
                self._block_unknown(context)
            else:
                rule(context)
        self._block_outputs()
        self._couple_shared_tensors()
        self.component = self._resolve()
        self.groups = self._make_groups()

    def shape_of(self, ref: Ref) -> Any:
        """Captured shape of the value ``ref`` points to."""
        shape = self.rnet.graph_nodes[ref.index].meta.get("out")
        for key in ref.path:
            shape = shape[key] if shape is not None else None
        return tuple(shape) if isinstance(shape, (tuple, list)) and all(isinstance(s, int) for s in shape) else shape

    # ---------------------------------------------------------------- building
    def _block_unknown(self, context: RuleContext) -> None:
        node = context.node
        for ref in context.tensor_args():
            labeling = context.labels(ref)
            if labeling is not None:
                self.unsupported.setdefault(node.op, node.describe())
                context.block(labeling, f"no channel rule for op {node.op}")

    def _block_outputs(self) -> None:
        outputs = self.rnet.output_refs()
        for (index, path), labeling in self.values.items():
            if any(ref.index == index and path[:len(ref.path)] == ref.path for ref in outputs):
                self.record.block(labeling.all_ids(), "reaches the network output")

    def _couple_shared_tensors(self) -> None:
        by_tensor: dict[tuple[int, int], list[Member]] = defaultdict(list)
        for member in self.members:
            tensor = _get_tensor(self.rnet.nodes[self.rnet.graph_nodes[member.node].key], member.tensor)
            by_tensor[(id(tensor), member.dim)].append(member)
        for members in by_tensor.values():
            for other in members[1:]:
                self.record.union(members[0].ids, other.ids)

    def _resolve(self) -> np.ndarray:
        """Components, after forcing multi-dim labelings to be sliceable (one free dim, the innermost)."""
        component = self.record.components()
        for _ in range(3):
            added = False
            for factor in (f for labeling in self.values.values() for f in labeling.factors if len(f.dims) > 1):
                comps = component[factor.ids]
                varying = [axis for axis in range(comps.ndim) if comps.shape[axis] > 1 and not np.all(
                    comps == comps.take([0], axis=axis))]
                for axis in varying[:-1]:
                    moved = np.moveaxis(factor.ids, axis, 0)
                    self.record.union(moved[:1], moved)
                    added = True
            if not added:
                break
            component = self.record.components()
        return component

    def _make_groups(self) -> list[ChannelGroup]:
        component = self.component
        blocked: dict[int, str] = {}
        for ids, reason in self.record.blocked:
            for comp in np.unique(component[ids]):
                blocked.setdefault(int(comp), reason)
        inexact = {int(c) for ids, _ in self.record.inexact for c in np.unique(component[ids])}
        touches: dict[int, dict[int, list[int]]] = defaultdict(dict)
        for m, member in enumerate(self.members):
            comps = component[member.ids]
            for position, comp in enumerate(comps.tolist()):
                touches[comp].setdefault(m, []).append(position)
        by_signature: dict[tuple, list[int]] = defaultdict(list)
        for comp, per_member in touches.items():
            signature = tuple((m, len(p)) for m, p in sorted(per_member.items()))
            by_signature[signature + (comp in blocked,)].append(comp)
        groups = []
        names = [n.name for n in self.rnet.graph_nodes]
        for signature, comps in by_signature.items():
            first = signature[0][0]
            comps.sort(key=lambda c: touches[c][first][0])
            members = [GroupMember(names[self.members[m].node], self.members[m].tensor, self.members[m].dim,
                                   self.members[m].role, [np.asarray(touches[c][m]) for c in comps])
                       for m, _ in signature[:-1]]
            reasons = [blocked[c] for c in comps if c in blocked]
            groups.append(ChannelGroup(0, len(comps), members, not reasons, not any(c in inexact for c in comps),
                                       reasons[0] if reasons else None, np.asarray(comps)))
        order = {name: i for i, name in enumerate(names)}
        groups.sort(key=lambda g: (min(order[m.node] for m in g.members), g.size))
        for i, group in enumerate(groups):
            group.id = i
        return groups


def _get_tensor(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module
