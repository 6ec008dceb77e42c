"""The dependency graph: run every node's channel rule once, resolve couplings, and group coupled channels."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn as nn

from ..ir import Ref
from .context import Member, RuleContext, SizeArg
from .labels import ElementRecord, Labeling
from .registry import find_rule


@dataclass
class GroupMember:
    """One tensor dim of a group: channel ``i`` of the group occupies ``positions[i]`` along ``dim``.

    ``positions`` is a (channels x positions-per-channel) integer array.
    """

    node: str
    tensor: str
    dim: int
    role: str
    positions: np.ndarray


@dataclass(eq=False)
class ChannelGroup:
    """A set of coupled channels: removing channel ``i`` removes ``positions[i]`` from every member.

    ``prunable`` is False when a channel reaches the network's inputs or outputs or passes an op with no rule
    (``reason`` says which); ``exact`` is False when removal changes other values (normalisation over channels).
    ``explicit_only`` groups (the hidden size of a transformer's residual stream) are prunable but skipped by
    automatic plans; ``reason`` then says why.
    """

    id: int
    size: int
    members: list[GroupMember]
    prunable: bool
    exact: bool
    reason: str | None
    components: np.ndarray = field(repr=False)
    explicit_only: bool = False

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def nodes(self) -> list[str]:
        """Names of the nodes this group touches."""
        return list(dict.fromkeys(m.node for m in self.members))

    def describe(self) -> str:
        """One line: id, size, flags and the members' nodes."""
        flags = ("prunable" if self.prunable else f"fixed: {self.reason}") + ("" if self.exact else ", inexact") + (
            f", only when named: {self.reason}" if self.explicit_only else "")
        return f"group {self.id}: {self.size} channels, {flags}; " + ", ".join(
            f"{m.node}.{m.tensor}[{m.dim}]" for m in self.members)


class DependencyGraph:
    """Channel couplings of a :class:`~graph.network.ReconstructedNetwork`, built once and queried."""

    def __init__(self, rnet):
        self.rnet = rnet
        self.record = ElementRecord()
        self.values: dict[tuple[int, tuple], Labeling] = {}
        self.members: list[Member] = []
        self.member_at: dict[tuple[int, str, int], Member] = {}
        self.size_args: list[SizeArg] = []
        self.size_constraints: list[tuple[np.ndarray, np.ndarray, str]] = []
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
        self._block_constant_dims()
        self.groups = self._make_groups()

    def channel_index(self, groups: list[ChannelGroup]) -> tuple[np.ndarray, np.ndarray]:
        """Two arrays over the components of :attr:`component`: the index in ``groups`` of the group each belongs to
        (-1 outside them) and its channel within that group; index them with ``component[ids]``."""
        size = int(self.component.max()) + 1 if self.component.size else 0
        group_of, channel_of = np.full(size, -1, dtype=np.int64), np.full(size, -1, dtype=np.int64)
        for index, group in enumerate(groups):
            group_of[group.components] = index
            channel_of[group.components] = np.arange(group.size)
        return group_of, channel_of

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
        """Components, after forcing multi-dim labelings to be sliceable (one free dim, the innermost) and computed
        sizes to follow the channels they read."""
        component = self.record.components()
        for _ in range(3):
            added = self._enforce_size_constraints(component)
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

    def _block_constant_dims(self) -> None:
        """Block every component that no parameter produces or carries: its members are dims of buffers and
        constants (a relative-position coordinate table) and their consumers, so its positions are data, not channels.
        """
        sourced = np.zeros(int(self.component.max()) + 1 if self.component.size else 0, dtype=bool)
        tensors = []
        for member in self.members:
            tensor = _get_tensor(self.rnet.nodes[self.rnet.graph_nodes[member.node].key], member.tensor)
            if member.role != "in" and isinstance(tensor, nn.Parameter):
                sourced[self.component[member.ids]] = True
            elif not isinstance(tensor, nn.Parameter):
                tensors.append((member, tensor))
        for member, tensor in tensors:
            ids = np.asarray(member.ids).ravel()
            unsourced = ids[~sourced[self.component[ids]]]
            if unsourced.size:
                node = self.rnet.graph_nodes[member.node]
                self.record.block(unsourced, f"holds no channels: {node.name} is a buffer or constant, and no "
                                             "parameter produces this dim")

    def _enforce_size_constraints(self, component: np.ndarray) -> bool:
        """Couple (and block) each computed-size dim whose elements are not coupled with the sizes it reads."""
        added = False
        for ids, sources, reason in self.size_constraints:
            if ids.shape[0] > 1 and not np.isin(component[ids], component[sources]).all():
                self.record.union(ids[:1], ids)
                if ids.ndim == 1:
                    self.record.block(ids, reason)
                added = True
        self.size_constraints = [c for c in self.size_constraints if np.isin(component[c[0]], component[c[1]]).all()]
        return added

    def _make_groups(self) -> list[ChannelGroup]:
        """One group per distinct signature: which members a component touches and at how many positions each."""
        component = self.component
        entries = _MemberEntries(component, self.members)
        blocked_by = _first_mark(component, self.record.blocked)
        inexact = _first_mark(component, self.record.inexact) >= 0
        explicit_by = _first_mark(component, self.record.explicit)
        signature_of, first_seen = entries.signatures(blocked_by >= 0)
        names = [n.name for n in self.rnet.graph_nodes]
        groups = []
        for signature in np.argsort(first_seen, kind="stable"):
            comps = np.flatnonzero(signature_of == signature)
            comps = comps[np.argsort(entries.first_position[comps])]
            members = [GroupMember(names[self.members[m].node], self.members[m].tensor, self.members[m].dim,
                                   self.members[m].role, positions)
                       for m, positions in entries.positions(comps)]
            reason = self.record.blocked[blocked_by[comps[0]]][1] if blocked_by[comps[0]] >= 0 else None
            explicit = reason is None and bool((explicit_by[comps] >= 0).any())
            if explicit:
                reason = self.record.explicit[explicit_by[comps][explicit_by[comps] >= 0][0]][1]
            prunable = bool(blocked_by[comps[0]] < 0)
            groups.append(ChannelGroup(0, len(comps), members, prunable, not inexact[comps].any(), reason, comps,
                                       explicit))
        order = {name: i for i, name in enumerate(names)}
        groups.sort(key=lambda g: (min(order[m.node] for m in g.members), g.size))
        for i, group in enumerate(groups):
            group.id = i
        return groups


class _MemberEntries:
    """Every (member, position) pair with its component, sorted by component, then member, then position."""

    def __init__(self, component: np.ndarray, members: list[Member]):
        comps = [component[np.asarray(m.ids).ravel()] for m in members]
        lengths = np.array([len(c) for c in comps], dtype=np.int64)
        flat_comp = np.concatenate(comps) if comps else np.zeros(0, np.int64)
        flat_member = np.repeat(np.arange(len(members)), lengths)
        flat_position = np.arange(len(flat_comp)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        self.order = np.argsort(flat_comp, kind="stable")
        self.comp, self.member = flat_comp[self.order], flat_member[self.order]
        self.position = flat_position[self.order]
        changes = np.flatnonzero((self.comp[1:] != self.comp[:-1]) | (self.member[1:] != self.member[:-1])) + 1
        self.pair_start = np.concatenate([[0], changes]).astype(np.int64)
        self.pair_count = np.diff(np.append(self.pair_start, len(self.comp)))
        pair_comp = self.comp[self.pair_start]
        self.comps = np.unique(pair_comp)
        self.comp_pairs = np.searchsorted(pair_comp, np.arange(len(component) + 1))
        self.first_position = np.zeros(len(component), dtype=np.int64)
        self.first_position[pair_comp[::-1]] = self.position[self.pair_start[::-1]]

    def signatures(self, blocked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per component, the index of its signature (-1 if untouched); per signature, its first entry's order."""
        signature_of = np.full(len(blocked), -1, dtype=np.int64)
        first_seen: list[np.ndarray] = []
        n_pairs = np.diff(self.comp_pairs)[self.comps]
        for k in np.unique(n_pairs):
            comps = self.comps[n_pairs == k]
            pairs = self.comp_pairs[comps][:, None] + np.arange(k)
            rows = np.column_stack([self.member[self.pair_start[pairs]], self.pair_count[pairs], blocked[comps]])
            inverse = _row_labels(rows)
            signature_of[comps] = inverse + sum(len(f) for f in first_seen)
            seen = np.full(inverse.max() + 1, len(self.order), dtype=np.int64)
            np.minimum.at(seen, inverse, self.order[self.pair_start[self.comp_pairs[comps]]])
            first_seen.append(seen)
        return signature_of, (np.concatenate(first_seen) if first_seen else np.zeros(0, np.int64))

    def positions(self, comps: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """For components sharing one signature: each member's positions, one row per component."""
        result = []
        for j in range(self.comp_pairs[comps[0] + 1] - self.comp_pairs[comps[0]]):
            starts = self.pair_start[self.comp_pairs[comps] + j]
            count = self.pair_count[self.comp_pairs[comps[0]] + j]
            result.append((int(self.member[starts[0]]), self.position[starts[:, None] + np.arange(count)]))
        return result


def _row_labels(rows: np.ndarray) -> np.ndarray:
    """Per row of a 2-d integer array, the rank of its value among the distinct rows in lexicographic order: the
    inverse of ``np.unique(rows, axis=0)``, through one ``lexsort`` (several times faster than sorting rows as
    structured values)."""
    order = np.lexsort(rows.T[::-1])
    ordered = rows[order]
    starts = np.ones(len(rows), dtype=bool)
    np.any(ordered[1:] != ordered[:-1], axis=1, out=starts[1:])
    labels = np.empty(len(rows), dtype=np.int64)
    labels[order] = np.cumsum(starts) - 1
    return labels


def _first_mark(component: np.ndarray, marks: list[tuple[np.ndarray, str]]) -> np.ndarray:
    """Per component, the index of the first mark (block or inexact) covering one of its elements, else -1."""
    first = np.full(component.max() + 1 if component.size else 0, -1, dtype=np.int64)
    for index in range(len(marks) - 1, -1, -1):
        first[component[marks[index][0]]] = index
    return first


def _get_tensor(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module
