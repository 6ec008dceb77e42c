"""Fast reward evaluation: held-out accuracy of a compressed network without re-running what did not change.

A policy changes the network only from its *first changed node* on (the first node whose weights the policy
masks). :class:`PrefixCache` keeps, for each such start, the values that the nodes before it hand to the nodes
after it, computed once per start on the fixed calibration and held-out batches; :class:`PolicyEvaluator` then
re-estimates the BatchNorm statistics of the changed part on the calibration batch and measures top-1 accuracy on
a few hundred held-out images, running only the suffix.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from compressors.base import CompressionError, batch_inputs, to_device
from graph.ir import iter_refs
from graph.network import ReplayState, compile_template


class SuffixProgram:
    """The nodes of ``rnet`` from index ``start`` on, compiled once, and the prefix values they read. The network's
    single input is node 0, so a suffix starts at 1 at the earliest (the input is always a prefix value)."""

    def __init__(self, rnet, start: int):
        nodes = rnet.graph_nodes
        start = max(start, 1)
        self.rnet, self.start, self.size = rnet, start, len(nodes)
        self.steps = [(index, rnet.nodes[node.key], compile_template(tuple(node.args)),
                       compile_template(dict(node.kwargs)))
                      for index, node in enumerate(nodes) if index >= start and node.op != "input"]
        self.output = compile_template(rnet.output_template)
        reads = [ref.index for node in nodes[start:] for ref in iter_refs((node.args, node.kwargs))]
        reads += [ref.index for ref in rnet.output_refs()]
        self.reads = sorted({index for index in reads if index < start})

    def prefix_values(self, inputs: torch.Tensor) -> dict[int, Any]:
        """The values of the prefix nodes that the suffix reads, from one full run of the network on ``inputs``."""
        values: dict[int, Any] = {}
        wanted = set(self.reads)
        positions = {id(node): index for index, node in enumerate(self.rnet.graph_nodes)}
        input_positions = [index for index, node in enumerate(self.rnet.graph_nodes) if node.op == "input"]

        def keep(node, args, kwargs, output) -> None:
            index = positions[id(node)]
            if index in wanted:
                values[index] = output

        with torch.no_grad():
            self.rnet.observe(keep, inputs)
        for index in input_positions:
            if index in wanted:
                values[index] = inputs
        return values

    def run(self, values: dict[int, Any]) -> Any:
        """The network's output, running only the suffix from the cached prefix ``values``."""
        run = ReplayState(self.size, self.rnet.training, None)
        env = run.env
        for index, value in values.items():
            env[index] = value
        for index, module, args, kwargs in self.steps:
            env[index] = module(*args(run), **kwargs(run))
        return self.output(run)


class PrefixCache:
    """Suffix programs and their prefix values for the few starts that policies use (least recently used dropped
    beyond ``capacity``). ``batches`` are the fixed input tensors every policy is evaluated on."""

    def __init__(self, rnet, batches: list[torch.Tensor], capacity: int = 4):
        if [index for index, node in enumerate(rnet.graph_nodes) if node.op == "input"] != [0]:
            raise CompressionError("the fast evaluator needs a network with a single tensor input")
        self.rnet, self.batches, self.capacity = rnet, batches, capacity
        self.entries: OrderedDict[int, tuple[SuffixProgram, list[dict[int, Any]]]] = OrderedDict()

    def entry(self, start: int) -> tuple[SuffixProgram, list[dict[int, Any]]]:
        """The suffix program from ``start`` and the prefix values of every batch (computed on first use, with the
        network as it is then: call before changing anything before ``start``)."""
        start = max(start, 1)
        if start in self.entries:
            self.entries.move_to_end(start)
            return self.entries[start]
        program = SuffixProgram(self.rnet, start)
        was_training = self.rnet.training
        self.rnet.eval()
        values = [program.prefix_values(batch) for batch in self.batches]
        self.rnet.train(was_training)
        self.entries[start] = (program, values)
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return self.entries[start]


def norms_from(rnet, start: int) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm modules of the nodes at or after index ``start``."""
    return [module for index, node in enumerate(rnet.graph_nodes) if index >= start and node.key
            for module in rnet.nodes[node.key].modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def first_batches(loader: DataLoader, count: int, device: torch.device | None,
                  labelled: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The first ``count`` examples of ``loader`` as a list of (inputs, labels) batches on ``device``: those of its
    dataset in index order when the dataset is indexable (the same images however the loader shuffles), else the
    first the loader yields."""
    if isinstance(getattr(loader, "dataset", None), Dataset) and hasattr(loader.dataset, "__len__") \
            and not isinstance(loader.dataset, IterableDataset):
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False,
                            collate_fn=loader.collate_fn)
    batches, total = [], 0
    for batch in loader:
        inputs = batch_inputs(batch)
        if not isinstance(inputs, torch.Tensor):
            raise CompressionError("the search evaluates networks with a single tensor input; the loader gives "
                                   f"{type(inputs).__name__} inputs")
        take = min(len(inputs), count - total)
        labels = batch[1][:take] if labelled else None
        if labelled and not isinstance(batch, (tuple, list)):
            raise CompressionError("the held-out loader must give (inputs, labels) batches")
        batches.append((to_device(inputs[:take], device), to_device(labels, device)))
        total += take
        if total >= count:
            break
    if not batches:
        raise CompressionError("a loader given to the search yielded no examples")
    return batches


class PolicyEvaluator:
    """Held-out top-1 accuracy of networks that differ from ``rnet`` only from some node on.

    ``heldout``: (inputs, labels) batches, never the test set; ``calibration``: input batches from the training data
    for BatchNorm re-estimation (``None`` to skip it). :meth:`accuracy` takes the network to measure (``rnet`` itself
    after in-place masking, or a same-graph compressed copy) and the index of its first changed node.
    """

    def __init__(self, rnet, heldout: list[tuple[torch.Tensor, torch.Tensor]], calibration: list[torch.Tensor] | None):
        self.rnet = rnet
        self.labels = [labels for _, labels in heldout]
        self.heldout = PrefixCache(rnet, [inputs for inputs, _ in heldout])
        self.calibration = PrefixCache(rnet, calibration) if calibration else None

    def accuracy(self, start: int, network: nn.Module | None = None, run_from: int | None = None) -> float:
        """Top-1 accuracy on the held-out batches of ``network`` (default: ``rnet`` as it is now), whose weights
        differ from ``rnet``'s from node ``start`` on and whose nodes before ``run_from`` (default: ``start`` for
        ``rnet`` itself, 0 for another network) are identical to ``rnet``'s: only the nodes from ``run_from`` on
        run, from the cached prefix. The BatchNorms from ``start`` on are first re-estimated on the calibration
        batch when one was given; the earlier ones keep their trained statistics, since their inputs did not
        change."""
        network = self.rnet if network is None else network
        if run_from is None:
            run_from = start if network is self.rnet else 0
        if self.calibration is not None:
            self._recalibrate(network, start, run_from)
        suffix, values = self._program(self.heldout, network, run_from)
        was_training = network.training
        network.eval()
        correct = total = 0
        with torch.no_grad():
            for cached, labels in zip(values, self.labels):
                logits = suffix.run(cached)
                correct += int((logits.argmax(dim=-1) == labels).sum())
                total += int(labels.numel())
        network.train(was_training)
        return correct / total

    def _program(self, cache: PrefixCache, network: nn.Module, run_from: int):
        program, values = cache.entry(run_from)
        return (program if network is self.rnet else SuffixProgram(network, run_from)), values

    def _recalibrate(self, network: nn.Module, start: int, run_from: int) -> None:
        norms = norms_from(network, start)
        if not norms:
            return
        suffix, values = self._program(self.calibration, network, run_from)
        saved = [norm.momentum for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        was_training = network.training
        network.eval()
        for norm in norms:
            norm.train()
        with torch.no_grad():
            for cached in values:
                suffix.run(cached)
        for norm, momentum in zip(norms, saved):
            norm.momentum = momentum
        network.train(was_training)
