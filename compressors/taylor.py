"""Taylor filter pruning (Molchanov et al., ICLR 2017 / CVPR 2019) on any captured network.

The importance of a channel is the first-order Taylor estimate of the loss change when it is removed:
``|activation x gradient|``, averaged over the positions of each example, taken in absolute value per example, then
averaged over examples (or smoothed across minibatches with a moving average). It is measured on the activations
the channel's *consumers* read (the input of the next conv or linear layer, after its ReLU), and summed over every
such activation of a dependency group, so residual streams, concatenations and UNet skips need no index lists.
Scores are ranked globally as they are (Molchanov 2019), or normalised per group (``normalize="l2"``, Molchanov
2017, or ``"rms"``): after the same fine-tuning the raw scores kept the most accuracy in ``bench/quality.py``, and
L2 normalisation the least, because it lowers the scores of wide groups and so prunes them hardest. An optional
FLOPs regulariser lowers each channel's score by its share of the
network's MACs times ``flops_regularization`` (Molchanov 2017, eq. 7), so costly channels go first; a latency
regulariser does the same with its share of the measured CPU time (:mod:`compressors.node_latency`), which also
counts the memory-bound ops MACs do not see.

:class:`TaylorImportance` is an ``importance=`` callable for :func:`graph.pruning.prune` too.
:class:`TaylorPruning` is the iterative loop: rank, prune to the next MACs step, fine-tune a few steps, repeat.
"""
from __future__ import annotations

import copy
import os
import weakref
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import trange

from graph.dependency import ChannelGroup
from graph.flops import count_flops
from graph.ir import iter_refs
from graph.network import ReconstructedNetwork
from graph.pruning import dependency_graph, multiply_adds, prune_channels

from .base import CompressionError, Compressor, batch_inputs, check_ratio, to_device
from .budget import plan_to_macs
from .node_latency import node_times, time_share_per_channel

LossFunction = Callable[[Any, Any], torch.Tensor]


def _first_example(value: Any) -> Any:
    """``value`` (nested tuples and dicts of tensors) with every tensor cut to its first example."""
    if isinstance(value, torch.Tensor):
        return value[:1]
    if isinstance(value, tuple):
        return tuple(_first_example(v) for v in value)
    if isinstance(value, dict):
        return {k: _first_example(v) for k, v in value.items()}
    return value


def _select(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


NORMALIZATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "l2": lambda s: s / (np.linalg.norm(s) or 1.0),
    "rms": lambda s: s / (np.sqrt(np.mean(np.square(s))) or 1.0),
}
"""Per-group score normalisations: ``"l2"`` (Molchanov 2017: unit L2 norm per layer, so a wide group's channels
score lower on average and wide groups are pruned harder) and ``"rms"`` (unit root-mean-square per group: the same
relative scores with no bias for the group's width)."""


def check_ranking_options(normalize: Any, flops_regularization: Any, latency_regularization: Any) -> None:
    """:class:`CompressionError` unless ``normalize`` is a key of :data:`NORMALIZATIONS` (or None) and both
    regularisation weights are non-negative numbers."""
    if normalize not in NORMALIZATIONS and normalize not in (None, False):
        raise CompressionError(f"normalize must be one of {sorted(NORMALIZATIONS)} or None, got {normalize!r}")
    for name, value in (("flops_regularization", flops_regularization),
                        ("latency_regularization", latency_regularization)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise CompressionError(f"{name} must be a non-negative number, got {value!r}")


class TaylorImportance:
    """Channel importance ``|activation x gradient|`` per group, from ``batches`` of ``(inputs, targets, ...)``.

    Call it as ``importance(rnet, group)`` (the ``importance=`` protocol of :mod:`graph.importance`) or get every
    group at once with :meth:`scores`. ``loss_fn(outputs, targets)`` defaults to cross-entropy.
    ``moving_average`` (a β in (0, 1)) smooths per-minibatch scores as ``s = β s + (1 - β) s_batch`` instead of
    averaging them. ``normalize``: None (raw scores), ``"l2"`` or ``"rms"`` per group (:data:`NORMALIZATIONS`).
    ``flops_regularization`` and ``latency_regularization`` subtract their weight times each channel's share of the
    network's MACs, and of the CPU time of one forward on ``latency_inputs`` (a tuple of inputs at the deployment
    size; default: the captured example at batch 1), from its share of the network's importance (so a weight of 1
    weighs the two alike). Results are cached per network.
    """

    def __init__(self, batches: Iterable[Any], loss_fn: LossFunction | None = None,
                 moving_average: float | None = None, flops_regularization: float = 0.0,
                 normalize: str | None = None, device: torch.device | str | None = None,
                 latency_regularization: float = 0.0, latency_inputs: tuple[Any, ...] | None = None):
        if moving_average is not None and not 0 < moving_average < 1:
            raise CompressionError(f"moving_average must be in (0, 1), got {moving_average}")
        check_ranking_options(normalize, flops_regularization, latency_regularization)
        self.batches, self.loss_fn = batches, loss_fn or F.cross_entropy
        self.moving_average, self.flops_regularization = moving_average, flops_regularization
        self.latency_regularization, self.latency_inputs = latency_regularization, latency_inputs
        self.normalize, self.device = normalize, device
        self._cache: "weakref.WeakKeyDictionary[nn.Module, dict[int, np.ndarray]]" = weakref.WeakKeyDictionary()

    def __call__(self, rnet: ReconstructedNetwork, group: ChannelGroup) -> np.ndarray:
        return self.scores(rnet)[group.id]

    def scores(self, rnet: ReconstructedNetwork) -> dict[int, np.ndarray]:
        """Scores of every prunable group, by group id: normalised per group as asked; with a regulariser, divided
        by their sum over the network (so a channel's score and its cost are both shares of one) and lowered by the
        weighted cost shares."""
        if rnet not in self._cache:
            raw = self.raw_scores(rnet)
            groups = {g.id: g for g in dependency_graph(rnet).groups}
            if self.normalize:
                raw = {gid: NORMALIZATIONS[self.normalize](s) for gid, s in raw.items()}
            if self.flops_regularization or self.latency_regularization:
                total = sum(float(s.sum()) for s in raw.values()) or 1.0
                raw = {gid: s / total for gid, s in raw.items()}
            if self.flops_regularization:
                shares = macs_share_per_channel(rnet, [groups[gid] for gid in raw])
                raw = {gid: s - self.flops_regularization * shares[gid] for gid, s in raw.items()}
            if self.latency_regularization:
                if self.latency_inputs is not None:
                    arguments, keywords = tuple(self.latency_inputs), {}
                else:
                    arguments, keywords = _first_example(rnet.example_inputs())
                times = node_times(rnet, to_device(arguments, self.device), to_device(keywords, self.device))
                shares = time_share_per_channel(rnet, [groups[gid] for gid in raw], times)
                raw = {gid: s - self.latency_regularization * shares[gid] for gid, s in raw.items()}
            self._cache[rnet] = raw
        return self._cache[rnet]

    def raw_scores(self, rnet: ReconstructedNetwork) -> dict[int, np.ndarray]:
        """Un-normalised ``mean_examples |mean_positions(a * dL/da)|``, summed over each group's consumed
        activations; one entry per prunable group."""
        graph = dependency_graph(rnet)
        groups = [g for g in graph.groups if g.prunable]
        group_of, channel_of = graph.channel_index(groups)
        watched = _consumed_values(rnet, graph, group_of)
        index_of = {id(node): i for i, node in enumerate(rnet.graph_nodes)}
        totals = [np.zeros(g.size) for g in groups]
        batches = 0
        was_training = rnet.training
        rnet.eval()
        try:
            for batch in self.batches:
                inputs, targets = to_device(batch_inputs(batch), self.device), to_device(batch[1], self.device)
                activations: dict[tuple, torch.Tensor] = {}

                def observer(node, args, kwargs, value, activations=activations):
                    for path, _ in watched.get(index_of[id(node)], ()):
                        tensor = _select(value, path)
                        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                            activations[(index_of[id(node)], path)] = tensor

                with torch.enable_grad():
                    outputs = rnet.observe(observer, *((inputs,) if not isinstance(inputs, dict) else ()),
                                           **(inputs if isinstance(inputs, dict) else {}))
                    loss = self.loss_fn(outputs, targets)
                    keys = list(activations)
                    grads = torch.autograd.grad(loss, [activations[k] for k in keys], allow_unused=True)
                batch_totals = [np.zeros(g.size) for g in groups]
                for key, grad in zip(keys, grads):
                    if grad is None:
                        continue
                    product = (activations[key].detach() * grad).float()
                    for factor in dict(watched[key[0]])[key[1]]:
                        _add_factor(product, factor, graph.component, group_of, channel_of, batch_totals)
                for total, batch_total in zip(totals, batch_totals):
                    if self.moving_average is not None and batches:
                        total *= self.moving_average
                        total += (1 - self.moving_average) * batch_total
                    else:
                        total += batch_total
                batches += 1
        finally:
            rnet.train(was_training)
        if batches == 0:
            raise CompressionError("Taylor importance got no batches")
        divisor = 1 if self.moving_average is not None else batches
        return {group.id: total / divisor for group, total in zip(groups, totals)}


def _consumed_values(rnet: ReconstructedNetwork, graph, group_of: np.ndarray) -> dict[int, list]:
    """For each node index, the ``(path, factors)`` of its output values that a consuming layer (a node with an
    ``"in"`` member) reads and that carry prunable channels."""
    consumers = {m.node for m in graph.members if m.role == "in"}
    keys = set()
    for index in consumers:
        node = rnet.graph_nodes[index]
        for ref in iter_refs((node.args, node.kwargs), through_sym=False):
            if (ref.index, ref.path) in graph.values:
                keys.add((ref.index, ref.path))
    watched: dict[int, list] = {}
    for index, path in sorted(keys):
        factors = [f for f in graph.values[(index, path)].factors
                   if 0 not in f.dims and (group_of[graph.component[f.ids.ravel()]] >= 0).any()]
        if factors:
            watched.setdefault(index, []).append((path, factors))
    return watched


def _add_factor(product: torch.Tensor, factor, component: np.ndarray, group_of: np.ndarray,
                channel_of: np.ndarray, totals: list[np.ndarray]) -> None:
    """Add ``mean_examples |mean over other dims(product)|`` at each of ``factor``'s positions to its channel."""
    others = [d for d in range(1, product.dim()) if d not in factor.dims]
    per_example = product.mean(dim=others) if others else product
    kept = [0] + [d for d in range(1, product.dim()) if d in factor.dims]
    order = [kept.index(d) for d in (0, *factor.dims)]
    per_example = per_example.permute(order).reshape(product.shape[0], -1)
    values = per_example.abs().mean(dim=0).cpu().double().numpy()
    comps = component[factor.ids.ravel()]
    groups, channels = group_of[comps], channel_of[comps]
    for index in np.unique(groups[groups >= 0]):
        hit = groups == index
        np.add.at(totals[index], channels[hit], values[hit])


def macs_share_per_channel(rnet: ReconstructedNetwork, groups: list[ChannelGroup]) -> dict[int, float]:
    """For each group, the share of the network's MACs one of its channels costs: every weight member's node MACs
    times the positions one channel holds over the tensor's size along that dim, summed, over total MACs."""
    report = count_flops(rnet)
    by_node, total = report.by_node, max(report.total_macs, 1)
    shares = {}
    for group in groups:
        cost = 0.0
        for member in group.members:
            row = by_node.get(member.node)
            if row is None or not row.macs or member.tensor != "weight" or member.role == "param":
                continue
            weight = rnet.module_of(rnet.node(member.node)).weight
            cost += row.macs * member.positions.shape[1] / weight.shape[member.dim]
        shares[group.id] = cost / total
    return shares


class TaylorPruning(Compressor):
    """Iterative Taylor pruning to ``flops_target`` (the fraction of MACs to keep) in ``steps`` rounds.

    Each round ranks every prunable channel globally by :class:`TaylorImportance` on ``taylor_batches`` training
    batches, prunes the lowest-ranked channels until the round's MACs target is met (targets fall linearly from
    the original MACs to ``flops_target`` of them; kept counts rounded to ``round_to``), then fine-tunes
    ``finetune_steps`` optimiser steps with :func:`trainers.finetune`. ``normalize``, ``flops_regularization``
    and ``latency_regularization`` (with ``latency_inputs`` at the deployment size) are :class:`TaylorImportance`'s.
    Each round's MACs and validation accuracy are logged (``history``, the JSON log, and a tensorboardX curve of
    accuracy against MACs in ``checkpointfolder/tensorboard``).
    """

    name = "taylor"

    def __init__(self, origin_net: nn.Module, trainloader=None, valloader=None, flops_target: float = 0.5,
                 round_to: int | None = None, steps: int = 5, finetune_steps: int = 50, lr: float = 0.01,
                 taylor_batches: int = 8, moving_average: float | None = None, flops_regularization: float = 0.0,
                 loss_fn: LossFunction | None = None, latency_regularization: float = 0.0,
                 latency_inputs: tuple[Any, ...] | None = None, normalize: str | None = None, **kwargs: Any):
        super().__init__(origin_net, trainloader, valloader, **kwargs)
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise CompressionError(f"round_to must be a positive integer, got {round_to!r}")
        for name, value in (("steps", steps), ("taylor_batches", taylor_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CompressionError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
            raise CompressionError(f"finetune_steps must be a non-negative integer, got {finetune_steps!r}")
        check_ranking_options(normalize, flops_regularization, latency_regularization)
        self.flops_target, self.round_to, self.steps = check_ratio("flops_target", flops_target), round_to, steps
        self.finetune_steps, self.lr, self.taylor_batches = finetune_steps, lr, taylor_batches
        self.moving_average, self.flops_regularization = moving_average, flops_regularization
        self.latency_regularization, self.latency_inputs = latency_regularization, latency_inputs
        self.loss_fn, self.normalize = loss_fn, normalize
        self.history: list[dict[str, Any]] = []

    def importance_batches(self) -> list[Any]:
        """The first ``taylor_batches`` training batches (inputs and targets)."""
        batches = []
        for batch in self.trainloader:
            batches.append(batch)
            if len(batches) >= self.taylor_batches:
                break
        return batches

    def collect_solve_rewrite(self) -> ReconstructedNetwork:
        """Rank, prune, fine-tune, repeat until the network needs ``flops_target`` of the original MACs."""
        from trainers.finetune import finetune

        network = copy.deepcopy(self.origin_net)
        original = multiply_adds(network)
        writer = self._writer()
        self.history = [{"step": 0, "macs": original, "accuracy": self._accuracy(network)}]
        for step in trange(1, self.steps + 1, desc="Taylor pruning", disable=not self.verbose):
            target = original * (1 - (1 - self.flops_target) * step / self.steps)
            importance = TaylorImportance(self.importance_batches(), self.loss_fn, self.moving_average,
                                          self.flops_regularization, device=self.device,
                                          latency_regularization=self.latency_regularization,
                                          latency_inputs=self.latency_inputs, normalize=self.normalize)
            scores = importance.scores(network)
            groups = {g.id: g for g in network.channel_groups()}
            ranked = {groups[gid]: s for gid, s in scores.items() if not groups[gid].explicit_only}
            plan = plan_to_macs(network, ranked, target, self.round_to)
            network = prune_channels(network, plan)
            if self.finetune_steps:
                finetune(network, self.trainloader, epochs=1, max_steps=self.finetune_steps, lr=self.lr,
                         device=self.device)
            network.eval()
            entry = {"step": step, "macs": multiply_adds(network), "accuracy": self._accuracy(network),
                     "removed": int(sum(len(v) for v in plan.values()))}
            self.history.append(entry)
            self.record(**entry)
            if writer is not None:
                writer.add_scalar("taylor/macs", entry["macs"], step)
                if entry["accuracy"] is not None:
                    writer.add_scalar("taylor/accuracy", entry["accuracy"], step)
                    writer.add_scalar("taylor/accuracy_vs_macs", entry["accuracy"], entry["macs"])
        if writer is not None:
            writer.close()
        return network

    def _accuracy(self, network: ReconstructedNetwork) -> float | None:
        return self.evaluate(network) if self.valloader is not None else None

    def _writer(self):
        if not self.checkpointfolder:
            return None
        from tensorboardX import SummaryWriter

        return SummaryWriter(logdir=os.path.join(self.checkpointfolder, "tensorboard"))
