"""The compressor the agent acts with, as a pluggable *action adapter*: it lists the units to decide, builds the
compressed network for one kept count per unit, and measures a policy's held-out accuracy as fast as it can.

``ACTIONS`` maps compressor names (``"l2"``, ``"channel-pruning"`` …) to adapter classes; ``COMPRESSOR_ACTIONS``
maps compressor class names (``ChannelPruning`` …) to the same. :func:`action_class` resolves either, or takes an
adapter class itself.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import numpy as np
import torch

from compressors.base import CompressionError
from graph.flops import count_flops
from graph.importance import group_importance, member_tensor
from graph.pruning import prune_channels

from .cost import CostModel, MacsModel, RankMacsModel
from .evaluation import PolicyEvaluator
from .units import Unit, allowed_keeps, channel_units, layer_features

EVALUATIONS = ("pruned", "masked")
"""How rewards are measured: on the physically compressed network (fewer MACs to run: the faster on CPU), or on
a same-size copy of the original masked in place (no network built per policy)."""
ACTIONS: dict[str, type["ActionAdapter"]] = {}
COMPRESSOR_ACTIONS: dict[str, type["ActionAdapter"]] = {}


def registers_action(*names: str, compressors: Sequence[str] = ()) -> Callable[[type], type]:
    """Class decorator: register an adapter under compressor ``names`` and compressor class names."""
    def register(cls: type) -> type:
        for name in names:
            ACTIONS[name] = cls
        for name in compressors:
            COMPRESSOR_ACTIONS[name] = cls
        return cls
    return register


def action_class(compressor: Any) -> type["ActionAdapter"]:
    """The adapter class for ``compressor``: a registered name, a compressor class (by its name) or an adapter
    class; :class:`CompressionError` listing the choices otherwise."""
    if isinstance(compressor, type) and issubclass(compressor, ActionAdapter):
        return compressor
    if isinstance(compressor, str) and compressor in ACTIONS:
        return ACTIONS[compressor]
    if isinstance(compressor, type) and compressor.__name__ in COMPRESSOR_ACTIONS:
        return COMPRESSOR_ACTIONS[compressor.__name__]
    shown = compressor.__name__ if isinstance(compressor, type) else repr(compressor)
    raise CompressionError(f"no search action for compressor {shown}; choose a name from {sorted(ACTIONS)} or a "
                           f"class from {sorted(COMPRESSOR_ACTIONS)}")


class ActionAdapter:
    """Base of the action adapters. ``rnet`` is the network to compress (never modified); ``trainloader`` gives
    calibration data to compressors that need it: batches of ``(inputs,)``, or ``(inputs, labels)`` for adapters
    whose :attr:`needs_labels` is true. Subclasses set :attr:`units` and implement :meth:`compress` and
    :meth:`first_changed`; :meth:`accuracy` defaults to measuring the compressed network. ``reference`` is the
    network the evaluator caches prefixes of (the one :meth:`accuracy` changes in place, if any)."""

    needs_labels = False

    def __init__(self, rnet, trainloader=None, *, lbound: float = 0.2, round_to: int | None = None,
                 ignore: Sequence[str] = (), device: torch.device | None = None, evaluation: str = "pruned"):
        if evaluation not in EVALUATIONS:
            raise CompressionError(f"evaluation must be one of {EVALUATIONS}, got {evaluation!r}")
        self.rnet, self.trainloader, self.device, self.evaluation = rnet, trainloader, device, evaluation
        self.reference = rnet
        self.units: list[Unit] = []

    def compress(self, keeps: Sequence[int]):
        """The compressed ``ReconstructedNetwork`` keeping ``keeps[i]`` of unit ``i``."""
        raise NotImplementedError

    def skeleton(self, keeps: Sequence[int]):
        """A network with the policy's sizes (which channels or ranks does not matter), for counting its cost;
        :meth:`compress` by default, something cheaper where the compressor is slow."""
        return self.compress(keeps)

    def macs_model(self) -> CostModel:
        """The MACs of a policy as a closed-form function of the kept counts (fitted on :meth:`skeleton`
        networks by default)."""
        return MacsModel(self.rnet, self.units, self.skeleton)

    def first_changed(self, keeps: Sequence[int]) -> int:
        """Index of the first node whose weights the policy changes (``len(graph_nodes)`` when none)."""
        raise NotImplementedError

    def unchanged_until(self, keeps: Sequence[int]) -> int:
        """Index of the first node the compressed network does not share unchanged with ``rnet`` (0 by default)."""
        return 0

    def accuracy(self, keeps: Sequence[int], evaluator: PolicyEvaluator) -> float:
        """Held-out accuracy of the policy: the compressed network, BatchNorms re-estimated from the first change,
        run from the first node it does not share with ``rnet``."""
        return evaluator.accuracy(self.first_changed(keeps), self.compress(keeps), self.unchanged_until(keeps))


class ChannelAction(ActionAdapter):
    """Base of the channel-pruning actions: one unit per prunable channel group (``rnet.channel_groups()``), so
    residual adds, concatenations and depthwise convs prune consistently; a policy changes the network from the
    first node that reads a pruned group."""

    def __init__(self, rnet, trainloader=None, *, lbound: float = 0.2, round_to: int | None = None,
                 ignore: Sequence[str] = (), device: torch.device | None = None, evaluation: str = "pruned"):
        super().__init__(rnet, trainloader, lbound=lbound, round_to=round_to, ignore=ignore, device=device,
                         evaluation=evaluation)
        self.units = channel_units(rnet, lbound, round_to, ignore)
        positions = {node.name: index for index, node in enumerate(rnet.graph_nodes)}
        self.consumers = [min((positions[m.node] for m in unit.key.members if m.role == "in"),
                              default=len(rnet.graph_nodes)) for unit in self.units]
        self.members = [min(positions[m.node] for m in unit.key.members) for unit in self.units]

    def unchanged_until(self, keeps: Sequence[int]) -> int:
        self._check(keeps)
        return min((self.members[i] for i, (unit, keep) in enumerate(zip(self.units, keeps)) if keep < unit.size),
                   default=len(self.rnet.graph_nodes))

    def skeleton(self, keeps: Sequence[int]):
        self._check(keeps)
        return prune_channels(self.rnet, {unit.key: range(unit.size - int(keep))
                                          for unit, keep in zip(self.units, keeps) if keep < unit.size})

    def first_changed(self, keeps: Sequence[int]) -> int:
        self._check(keeps)
        changed = [self.consumers[i] for i, (unit, keep) in enumerate(zip(self.units, keeps)) if keep < unit.size]
        return min(changed, default=len(self.rnet.graph_nodes))

    def _check(self, keeps: Sequence[int]) -> None:
        if len(keeps) != len(self.units):
            raise CompressionError(f"expected {len(self.units)} kept counts, got {len(keeps)}")
        for unit, keep in zip(self.units, keeps):
            if not 1 <= int(keep) <= unit.size:
                raise CompressionError(f"unit {unit.name} has {unit.size} channels; cannot keep {keep}")


@registers_action("l2", "channel-l2", "magnitude")
class L2ChannelAction(ChannelAction):
    """Channel pruning that keeps each group's channels of largest L2 norm (``graph.importance``, summed over the
    group's members). With ``evaluation="masked"`` rewards are measured on a working copy masked in place (exact for
    channel-wise groups; a network with an inexact group, a norm over channels, is measured pruned instead)."""

    def __init__(self, rnet, trainloader=None, *, lbound: float = 0.2, round_to: int | None = None,
                 ignore: Sequence[str] = (), device: torch.device | None = None, evaluation: str = "pruned"):
        super().__init__(rnet, trainloader, lbound=lbound, round_to=round_to, ignore=ignore, device=device,
                         evaluation=evaluation)
        self.order = [np.argsort(scores, kind="stable") for scores in self.unit_scores()]
        self.masked = evaluation == "masked" and all(unit.key.exact for unit in self.units)
        if self.masked:
            self.work = copy.deepcopy(rnet)
            self.saved = self._snapshot()
            self.reference = self.work

    def unit_scores(self) -> list[np.ndarray]:
        """Each unit's channel scores (higher is kept): the L2 norms summed over the group's members."""
        reduced: dict = {}
        return [group_importance(self.rnet, unit.key, "l2", reduced) for unit in self.units]

    def plan(self, keeps: Sequence[int]) -> dict:
        """The pruning plan ``{group: channels to remove}`` (the least important ``size - keep`` of each group)."""
        self._check(keeps)
        return {unit.key: sorted(self.order[i][:unit.size - int(keep)].tolist())
                for i, (unit, keep) in enumerate(zip(self.units, keeps)) if keep < unit.size}

    def compress(self, keeps: Sequence[int]):
        return prune_channels(self.rnet, self.plan(keeps))

    def accuracy(self, keeps: Sequence[int], evaluator: PolicyEvaluator) -> float:
        if not self.masked:
            return super().accuracy(keeps, evaluator)
        self._restore()
        plan = self.plan(keeps)
        with torch.no_grad():
            for unit in self.units:
                removed = plan.get(unit.key)
                if not removed:
                    continue
                for member in unit.key.members:
                    if member.role != "in":
                        continue
                    tensor = member_tensor(self.work, member.node, member.tensor)
                    index = torch.as_tensor(member.positions[removed].ravel(), device=tensor.device)
                    tensor.index_fill_(member.dim, index, 0)
        return evaluator.accuracy(self.first_changed(keeps))

    def _snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(live tensor, original copy) of every tensor the working copy's masking or BN re-estimation changes."""
        tensors = {}
        for unit in self.units:
            for member in unit.key.members:
                if member.role == "in":
                    tensor = member_tensor(self.work, member.node, member.tensor)
                    tensors[id(tensor)] = tensor
        for module in self.work.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                for buffer in module.buffers():
                    tensors[id(buffer)] = buffer
        return [(tensor, tensor.detach().clone()) for tensor in tensors.values()]

    def _restore(self) -> None:
        with torch.no_grad():
            for tensor, original in self.saved:
                tensor.copy_(original)


@registers_action("taylor", compressors=("TaylorPruning",))
class TaylorChannelAction(L2ChannelAction):
    """Channel pruning that keeps each group's channels of largest Taylor importance (|activation x gradient| of
    the cross-entropy loss, :class:`compressors.taylor.TaylorImportance`), measured once on the labelled
    calibration batches; otherwise as :class:`L2ChannelAction` (no fine-tuning inside the search)."""

    needs_labels = True

    def unit_scores(self) -> list[np.ndarray]:
        from compressors.taylor import TaylorImportance

        if not self.trainloader:
            raise CompressionError("the taylor action needs labelled calibration batches (a trainloader)")
        scores = TaylorImportance(self.trainloader, device=self.device).scores(self.rnet)
        return [scores[unit.key.id] for unit in self.units]


@registers_action("channel-pruning", "lasso", compressors=("ChannelPruning", "ChannelPrunning"))
class LassoChannelAction(ChannelAction):
    """He et al.'s channel pruning as the action (:class:`compressors.channel_pruning.ChannelPruning`): per group,
    LASSO channel selection over every consumer and a least-squares refit, on the calibration images. Each
    evaluation runs the compressor (seconds, not milliseconds: budget the episodes accordingly); its BatchNorm
    re-estimation is the evaluator's, as for every action."""

    def __init__(self, rnet, trainloader=None, *, lbound: float = 0.2, round_to: int | None = None,
                 ignore: Sequence[str] = (), device: torch.device | None = None, evaluation: str = "pruned"):
        if evaluation != "pruned":
            raise CompressionError("the channel-pruning action refits weights: its rewards can only be measured on "
                                   "the pruned network (evaluation='pruned')")
        super().__init__(rnet, trainloader, lbound=lbound, round_to=round_to, ignore=ignore, device=device)
        if trainloader is None:
            raise CompressionError("the channel-pruning action needs calibration data (a trainloader)")

    def compress(self, keeps: Sequence[int]):
        from compressors.channel_pruning import ChannelPruning

        self._check(keeps)
        compressor = ChannelPruning(self.rnet, self.trainloader, compress_ratio=0.5, recalibrate_bn=False,
                                    device=self.device)
        # compress_ratio is per consumer layer, which cannot give two groups read by one layer (a concat's
        # reader) different counts; the compressor's per-group removal counts can.
        compressor.removal = {unit.key.id: unit.size - int(keep) for unit, keep in zip(self.units, keeps)
                              if keep < unit.size}
        return compressor.compress()


@registers_action("low-rank", compressors=("LowRankDecomposition", "LowRankDecompostion"))
class LowRankAction(ActionAdapter):
    """Low-rank decomposition as the action (:class:`compressors.low_rank.LowRankDecomposition`): one unit per
    decomposable Linear or convolution; a unit's kept count is the rank per group, and its size (the largest rank
    that saves MACs, plus one) means the layer stays whole, so kept / size is about the fraction of the layer's MACs
    kept. ``"low-rank"`` fits the factors to the calibration images' responses (seconds per evaluation);
    ``"low-rank-weight"`` is the truncated SVD of the weights. MACs budgets only; rewards on the decomposed
    network."""

    method = "data"

    def __init__(self, rnet, trainloader=None, *, lbound: float = 0.2, round_to: int | None = None,
                 ignore: Sequence[str] = (), device: torch.device | None = None, evaluation: str = "pruned"):
        if evaluation != "pruned":
            raise CompressionError("the low-rank action replaces layers: its rewards can only be measured on the "
                                   "decomposed network (evaluation='pruned')")
        super().__init__(rnet, trainloader, lbound=lbound, round_to=round_to, ignore=ignore, device=device)
        if self.method == "data" and not trainloader:
            raise CompressionError("the data-driven low-rank action needs calibration data (a trainloader)")
        from compressors.low_rank_layers import candidates

        macs = {row.name: row.macs or 0 for row in count_flops(rnet).rows}
        positions = {node.name: index for index, node in enumerate(rnet.graph_nodes)}
        ignored = set(ignore)
        unknown = sorted(ignored - set(positions))
        if unknown:
            raise CompressionError(f"ignore names {unknown[0]!r}, which is not a node of this network")
        for candidate in candidates(rnet, macs):
            size = candidate.max_rank + 1
            keeps = allowed_keeps(size, lbound, round_to)
            if candidate.name in ignored or len(keeps) < 2:
                continue
            module = rnet.module_of(rnet.node(candidate.name))
            self.units.append(Unit(candidate.name, size, keeps, layer_features(module, size), candidate))
        if not self.units:
            raise CompressionError("the network has no decomposable layer to search over (no Linear or convolution "
                                   "that a low rank makes cheaper, or all ignored or too small for round_to)")
        self.positions = [positions[unit.name] for unit in self.units]

    def ranks(self, keeps: Sequence[int]) -> dict[str, int]:
        """Rank per group of every layer the policy decomposes (layers kept whole are left out)."""
        if len(keeps) != len(self.units):
            raise CompressionError(f"expected {len(self.units)} kept ranks, got {len(keeps)}")
        for unit, keep in zip(self.units, keeps):
            if not 1 <= int(keep) <= unit.size:
                raise CompressionError(f"unit {unit.name} takes ranks 1 to {unit.size - 1} ({unit.size}: whole); "
                                       f"got {keep}")
        return {unit.name: int(keep) for unit, keep in zip(self.units, keeps) if keep < unit.size}

    def compress(self, keeps: Sequence[int]):
        from compressors.low_rank import LowRankDecomposition

        ranks = self.ranks(keeps)
        if not ranks:
            return copy.deepcopy(self.rnet)
        # the weight SVD reads no data; the compressor base still wants a batch: the captured example serves
        batches = self.trainloader or [(torch.ones(self.rnet.graph_nodes[0].meta["out"]),)]
        return LowRankDecomposition(self.rnet, batches, ranks=ranks, method=self.method, recalibrate_bn=False,
                                    device=self.device).compress()

    def macs_model(self) -> CostModel:
        return RankMacsModel(self.rnet, self.units)

    def first_changed(self, keeps: Sequence[int]) -> int:
        ranks = self.ranks(keeps)
        return min((position for position, unit in zip(self.positions, self.units) if unit.name in ranks),
                   default=len(self.rnet.graph_nodes))

    def unchanged_until(self, keeps: Sequence[int]) -> int:
        return self.first_changed(keeps)


@registers_action("low-rank-weight")
class WeightLowRankAction(LowRankAction):
    """:class:`LowRankAction` with factors from the truncated SVD of the weights (no calibration pass)."""

    method = "weight"
