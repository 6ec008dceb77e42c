"""The base every compressor shares: validate arguments, capture the user's model, **collect → solve → rewrite**,
then log, checkpoint and draw.

A subclass implements :meth:`Compressor.collect_solve_rewrite` (or the three steps separately, as it likes) and
returns the compressed :class:`~graph.network.ReconstructedNetwork`. The base gives it calibration batches from
``trainset_ratio`` of the training loader (with a tqdm bar), top-1 evaluation, BatchNorm recalibration, per-layer
ratio resolution (``compress_ratio`` as a number or a dict by node name, or a whole-network ``flops_target``) and a
JSON log of per-layer choices. ``origin_net`` and the user's module are never modified.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from graph.capture import capture
from graph.network import ReconstructedNetwork
from graph.serialization.atomic import atomic_path

Ratio = float | Mapping[str, float]


class CompressionError(ValueError):
    """An argument of a compressor is invalid (names the argument and what is wrong with it)."""


def batch_inputs(batch: Any) -> Any:
    """The network input of one loader batch: the first item of an ``(inputs, labels, ...)`` tuple or list, the batch
    itself otherwise (a tensor, or a dict of keyword inputs)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def run_network(network: nn.Module, inputs: Any) -> Any:
    """Call ``network`` on one batch's inputs (keyword inputs when they are a dict)."""
    return network(**inputs) if isinstance(inputs, dict) else network(inputs)


def to_device(value: Any, device: torch.device | str | None) -> Any:
    """``value`` (a tensor or nested tuples, lists and dicts of them) moved to ``device``."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def as_network(model: nn.Module, example_inputs: Any) -> ReconstructedNetwork:
    """``model`` as a :class:`ReconstructedNetwork`: a deep copy when it already is one, else captured (in eval
    mode, from a deep copy) on ``example_inputs``; the caller's module is never modified."""
    if isinstance(model, ReconstructedNetwork):
        return copy.deepcopy(model)
    if not isinstance(model, nn.Module):
        raise CompressionError(f"origin_net must be an nn.Module or a ReconstructedNetwork, got {type(model).__name__}")
    network = copy.deepcopy(model).eval()
    if isinstance(example_inputs, dict):
        return capture(network, **example_inputs)
    return capture(network, example_inputs)


def check_ratio(name: str, value: float) -> float:
    """``value`` as a float in (0, 1); :class:`CompressionError` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CompressionError(f"{name} must be a number in (0, 1), got {value!r}")
    if not 0 < value < 1:
        raise CompressionError(f"{name} must be in (0, 1), got {value}")
    return float(value)


def top1_accuracy(network: nn.Module, loader: DataLoader, device: torch.device | str | None = None,
                  limit: int | None = None) -> float:
    """Top-1 accuracy over ``loader`` (at most ``limit`` examples; for dense outputs such as segmentation logits
    ``(N, C, H, W)`` every labelled position counts), classes along dim 1 as in ``F.cross_entropy``, in eval mode
    without grad; the network's mode is restored afterwards."""
    was_training = network.training
    network.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            inputs, labels = to_device(batch_inputs(batch), device), to_device(batch[1], device)
            logits = run_network(network, inputs)
            correct += int((logits.argmax(dim=1) == labels).sum())
            total += int(labels.numel())
            if limit is not None and total >= limit:
                break
    network.train(was_training)
    if total == 0:
        raise CompressionError("the evaluation loader yielded no examples")
    return correct / total


def recalibrate_batchnorm(network: nn.Module, batches: Iterator[Any], device: torch.device | str | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics from ``batches`` (cumulative averages, no weight changes):
    pruning shifts the statistics the network was trained with, and this alone recovers much of the accuracy.
    Returns the number of batches used; the network ends in eval mode."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = [(m.momentum, m.training) for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    network.train()
    count = 0
    with torch.no_grad():
        for inputs in batches:
            run_network(network, to_device(inputs, device))
            count += 1
    for norm, (momentum, _) in zip(norms, saved):
        norm.momentum = momentum
    network.eval()
    return count


class Compressor:
    """Base of every compressor. Subclasses implement :meth:`collect_solve_rewrite`; users call :meth:`compress`
    and read :attr:`compressed_net`.

    ``origin_net`` is an ``nn.Module`` (captured from the first training batch) or a ``ReconstructedNetwork``;
    ``trainloader`` gives calibration data (``trainset_ratio`` of it is used), ``valloader`` accuracy for
    ``accuracy_first``. The argument names are the AMC wiki's.
    """

    name = "compressor"

    def __init__(self, origin_net: nn.Module, trainloader: DataLoader | None = None,
                 valloader: DataLoader | None = None, trainset_ratio: float = 1.0,
                 checkpointfolder: str | os.PathLike | None = None, device: torch.device | str | None = None,
                 verbose: bool = False, drawgraph: bool = False, accuracy_first: bool = False,
                 accuracy_threshold: float = 0.0, args: Any = None):
        if trainloader is None:
            raise CompressionError(f"{type(self).__name__} needs a trainloader for calibration data")
        if isinstance(trainset_ratio, bool) or not isinstance(trainset_ratio, (int, float)) \
                or not 0 < trainset_ratio <= 1:
            raise CompressionError(f"trainset_ratio must be in (0, 1], got {trainset_ratio!r}")
        if accuracy_first and valloader is None:
            raise CompressionError("accuracy_first needs a valloader to measure accuracy on")
        if not isinstance(accuracy_threshold, (int, float)) or accuracy_threshold < 0:
            raise CompressionError(f"accuracy_threshold must be a non-negative number, got {accuracy_threshold!r}")
        self.trainloader, self.valloader = trainloader, valloader
        self.trainset_ratio = float(trainset_ratio)
        self.checkpointfolder = os.fspath(checkpointfolder) if checkpointfolder is not None else None
        self.device = torch.device(device) if device is not None else None
        self.verbose, self.drawgraph = verbose, drawgraph
        self.accuracy_first, self.accuracy_threshold = accuracy_first, float(accuracy_threshold)
        self.args = args
        self.user_module = None if isinstance(origin_net, ReconstructedNetwork) else origin_net
        self.origin_net = as_network(origin_net, self.first_inputs())
        if self.device is not None:
            self.origin_net.to(self.device)
        self.compressed_net: ReconstructedNetwork | None = None
        self.log: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ data
    def first_inputs(self) -> Any:
        """The inputs of the training loader's first batch; :class:`CompressionError` when the loader is empty."""
        for batch in self.trainloader:
            return batch_inputs(batch)
        raise CompressionError("trainloader yielded no batches")

    def calibration_batches(self, description: str | None = None) -> Iterator[Any]:
        """Inputs of the first ``trainset_ratio`` of the training loader's batches (at least one), on the device,
        with a tqdm bar labelled ``description``."""
        total = max(1, int(math.ceil(len(self.trainloader) * self.trainset_ratio)))
        bar = tqdm(total=total, desc=description or self.name, disable=not self.verbose, leave=False)
        try:
            for count, batch in enumerate(self.trainloader):
                if count >= total:
                    break
                bar.update(1)
                yield to_device(batch_inputs(batch), self.device)
        finally:
            bar.close()

    def evaluate(self, network: nn.Module, loader: DataLoader | None = None, limit: int | None = None) -> float:
        """Top-1 accuracy of ``network`` on ``loader`` (the valloader by default)."""
        loader = loader if loader is not None else self.valloader
        if loader is None:
            raise CompressionError("no valloader to evaluate on")
        return top1_accuracy(network, loader, self.device, limit)

    # ------------------------------------------------------------------ ratios
    def resolve_ratios(self, ratio: Ratio, candidates: list[str], name: str = "compress_ratio") -> dict[str, float]:
        """``ratio`` per candidate node name: a number applies to all, a dict names nodes (each must be a candidate;
        the others are left alone). Every value must lie in (0, 1)."""
        if isinstance(ratio, Mapping):
            unknown = sorted(set(ratio) - set(candidates))
            if unknown:
                raise CompressionError(f"{name} names {unknown[0]!r}, which is not a compressible node of this "
                                       f"network (compressible: {', '.join(candidates[:8])}"
                                       f"{' ...' if len(candidates) > 8 else ''})")
            return {node: check_ratio(f"{name}[{node!r}]", value) for node, value in ratio.items()}
        value = check_ratio(name, ratio)
        return {node: value for node in candidates}

    # ------------------------------------------------------------------ the pipeline
    def collect_solve_rewrite(self) -> ReconstructedNetwork:
        """Collect statistics, solve for what to keep, rewrite the network; returns the compressed network."""
        raise NotImplementedError(f"{type(self).__name__} must implement collect_solve_rewrite")

    def compress(self) -> ReconstructedNetwork:
        """Run the compressor; the result is also left in :attr:`compressed_net`. Writes the compressed network and
        ``compress_log.json`` to ``checkpointfolder`` and draws both graphs when ``drawgraph`` is set."""
        if self.checkpointfolder:
            os.makedirs(self.checkpointfolder, exist_ok=True)
        self.log = []
        self.compressed_net = self.collect_solve_rewrite()
        if self.checkpointfolder:
            self.write_checkpoint()
        return self.compressed_net

    def record(self, **entry: Any) -> None:
        """Add one per-layer choice to the log (printed when ``verbose``)."""
        self.log.append(entry)
        if self.verbose:
            tqdm.write(f"{self.name}: " + ", ".join(f"{k}={v}" for k, v in entry.items()))

    def write_checkpoint(self) -> None:
        """Save the compressed network (``compressed.pkl``), the log (``compress_log.json``) and, with
        ``drawgraph``, drawings of both graphs, all atomically."""
        from graph.flops import count_flops

        folder = self.checkpointfolder
        self.compressed_net.save(pkl=os.path.join(folder, "compressed.pkl"))
        summary = {"compressor": type(self).__name__,
                   "macs_before": count_flops(self.origin_net).total_macs,
                   "macs_after": count_flops(self.compressed_net).total_macs,
                   "layers": self.log}
        with atomic_path(os.path.join(folder, "compress_log.json")) as temporary:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(summary, handle, indent=2, default=_json_default)
        if self.drawgraph:
            self.origin_net.draw(os.path.join(folder, "origin_net.svg"))
            self.compressed_net.draw(os.path.join(folder, "compressed_net.svg"))


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


CompressorFactory = Callable[..., Compressor]
