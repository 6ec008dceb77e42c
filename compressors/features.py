"""Layer statistics for data-driven compressors, in bounded memory: running ``XᵀX``, ``XᵀY`` (and optionally ``YᵀY``)
of a layer's unfolded inputs ``X`` and its responses ``Y``, sampled at a few output positions per example.

A layer computes ``Y = X Wᵀ + b`` row by row, where a row of ``X`` is what one output position reads: the flattened
receptive-field patch of a convolution (``C·kh·kw`` values, in the order of ``weight.reshape(n, -1)``), or the
feature vector of one token of a Linear. Channel pruning (LASSO selection and least-squares refit) and data-driven
low-rank decomposition need only these second moments, so nothing is stored across batches: each batch adds its
sampled rows to float64 accumulators whose size depends on the layer, not on the data.

``X`` may come from one network (the one being compressed) and ``Y`` from another with the same node names (the
original): the asymmetric reconstruction of He et al. 2017 and Zhang et al. 2016, where errors do not accumulate.

Row extraction is one small handler per module type (:data:`ROW_EXTRACTORS`); register more there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import CompressionError, run_network


@dataclass
class LayerStatistics:
    """Running second moments of one layer: ``xtx`` = ``XᵀX`` (F×F), ``xty`` = ``XᵀY`` (F×n), ``yty`` = ``YᵀY``
    (n×n, or None when not asked for), ``energy`` = ``‖Y‖²``, ``count`` rows. With ``append_ones`` the last column
    of ``X`` is a constant 1, so a bias can be fitted with the weights. All float64."""

    xtx: torch.Tensor
    xty: torch.Tensor
    yty: torch.Tensor | None
    energy: float = 0.0
    count: int = 0

    def error(self, solution: torch.Tensor, columns: torch.Tensor | None = None) -> float:
        """``‖Y - X[:, columns] · solution‖²`` (all columns when None) from the moments alone; ``solution`` is
        (columns × n), i.e. the transposed weight matrix."""
        solution = solution.double()
        xtx, xty = (self.xtx, self.xty) if columns is None else (self.xtx[columns][:, columns], self.xty[columns])
        return float(self.energy - 2 * (solution * xty).sum() + (solution * (xtx @ solution)).sum())

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the rows ``x`` (rows×F) and their targets ``y`` (rows×n)."""
        x, y = x.double(), y.double()
        self.xtx += x.T @ x
        self.xty += x.T @ y
        if self.yty is not None:
            self.yty += y.T @ y
        self.energy += float(y.square().sum())
        self.count += x.shape[0]


class RowExtractor:
    """How to read rows from one kind of layer: ``positions(output)`` is the number of output positions per example,
    ``inputs(module, x, index)`` the unfolded input rows and ``targets(output, index)`` the response rows at the
    sampled ``index`` (examples × samples, flat output positions)."""

    def positions(self, output: torch.Tensor) -> int:
        raise NotImplementedError

    def inputs(self, module: nn.Module, x: torch.Tensor, output_shape: torch.Size, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def targets(self, output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LinearRows(RowExtractor):
    """``nn.Linear`` on ``(N, ..., F)``: one row per token (every leading dim after the first is a position)."""

    def positions(self, output: torch.Tensor) -> int:
        return math.prod(output.shape[1:-1])

    def inputs(self, module: nn.Module, x: torch.Tensor, output_shape: torch.Size, index: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        return rows[torch.arange(x.shape[0], device=x.device)[:, None], index].reshape(-1, x.shape[-1])

    def targets(self, output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.inputs(None, output, output.shape, index)


class ConvRows(RowExtractor):
    """``nn.Conv1d/2d/3d`` with ``groups == 1``: the receptive-field patch of each sampled output position, gathered
    directly (no full ``unfold``), with the module's padding mode, stride and dilation."""

    def positions(self, output: torch.Tensor) -> int:
        return math.prod(output.shape[2:])

    def inputs(self, module: nn.Module, x: torch.Tensor, output_shape: torch.Size, index: torch.Tensor) -> torch.Tensor:
        if module.groups != 1:
            raise CompressionError(f"{type(module).__name__} with groups={module.groups}: rows are only defined for "
                                   "groups=1")
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        padded = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        spatial = tuple(output_shape[2:])
        coords = torch.unravel_index(index, spatial)
        grids = torch.meshgrid(*[torch.arange(k, device=x.device) for k in module.kernel_size], indexing="ij")
        offsets = [g.reshape(-1) for g in grids]
        gathered = [c[..., None] * s + o * d for c, o, s, d in zip(coords, offsets, module.stride, module.dilation)]
        batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
        patches = padded[(batch, slice(None), *gathered)]  # (N, samples, K, C): the advanced dims come first
        return patches.permute(0, 1, 3, 2).reshape(-1, x.shape[1] * offsets[0].numel())

    def targets(self, output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        flat = output.flatten(2)
        return flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1)).permute(0, 2, 1).reshape(
            -1, flat.shape[1])


ROW_EXTRACTORS: dict[type, RowExtractor] = {nn.Linear: LinearRows(), nn.Conv1d: ConvRows(), nn.Conv2d: ConvRows(),
                                            nn.Conv3d: ConvRows()}


def row_extractor(module: nn.Module) -> RowExtractor | None:
    """The handler for ``module``'s type (looked up along its class hierarchy), or None when there is none or the
    layer is a grouped convolution (whose output is not one dense product of a patch)."""
    if getattr(module, "groups", 1) != 1:
        return None
    return next((ROW_EXTRACTORS[cls] for cls in type(module).__mro__ if cls in ROW_EXTRACTORS), None)


def sample_positions(examples: int, positions: int, samples: int, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """``samples`` distinct flat positions per example (all of them, in order, when there are no more), as an
    ``(examples, min(samples, positions))`` index."""
    if samples >= positions:
        return torch.arange(positions, device=device).expand(examples, -1)
    keys = torch.rand(examples, positions, generator=generator)
    return keys.topk(samples, dim=1).indices.to(device)


class _Stop(Exception):
    """Raised by an observer once every requested node has been seen (the rest of the forward is not needed)."""


def _observe_until(network, nodes: set[str], inputs: Any, seen: Callable[[str, tuple, Any], None]) -> None:
    names = [n.name for n in network.graph_nodes]
    last = max(names.index(name) for name in nodes)

    def observer(node, args, kwargs, output):
        if node.name in nodes:
            seen(node.name, args, output)
        if node.name == names[last]:
            raise _Stop

    try:
        if isinstance(inputs, dict):
            network.observe(observer, **inputs)
        else:
            network.observe(observer, inputs)
    except _Stop:
        pass


def _check_finite(values: torch.Tensor, what: str, node: str) -> None:
    if not torch.isfinite(values).all():
        raise CompressionError(f"NaN or inf in the {what} of {node!r} during feature collection: check the "
                               "calibration data and the network's weights")


def _layer_extractors(network, nodes: Iterable[str], lookup: Callable[[nn.Module], RowExtractor | None],
                      unsupported: str) -> dict[str, RowExtractor]:
    """The row handler of each named node, in order; :class:`CompressionError` for a name that is not a node or a
    node ``lookup`` has no handler for (``unsupported`` says what the node is not)."""
    extractors = {}
    for name in dict.fromkeys(nodes):
        try:
            node = network.node(name)
        except KeyError:
            raise CompressionError(f"{name!r} is not a node of this network") from None
        extractor = lookup(network.module_of(node)) if node.key else None
        if extractor is None:
            raise CompressionError(f"{name!r} ({node.op}) is not {unsupported} "
                                   f"(supported: {', '.join(sorted(t.__name__ for t in ROW_EXTRACTORS))})")
        extractors[name] = extractor
    return extractors


RowSink = Callable[[str, tuple, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``sink(name, args, output, index, target_rows)``: a node's inputs and output in the network being compressed,
the sampled positions and the reference's output rows there."""


def _collect_rows(network, extractors: dict[str, RowExtractor], batches: Iterable[Any], reference,
                  samples_per_example: int, seed: int, sink: RowSink) -> None:
    """For every batch: sample ``samples_per_example`` output positions per example of each node in ``reference``
    (``network`` itself without one), read the reference's output rows there, then hand the same node's values in
    ``network`` to ``sink``. Each forward stops after the last node."""
    if samples_per_example < 1:
        raise CompressionError(f"samples per example must be positive, got {samples_per_example}")
    generator = torch.Generator().manual_seed(seed)
    wanted = set(extractors)
    with torch.no_grad():
        for inputs in batches:
            targets: dict[str, tuple[torch.Tensor, torch.Size, torch.Tensor]] = {}

            def take_targets(name: str, args: tuple, output: torch.Tensor) -> None:
                extractor = extractors[name]
                index = sample_positions(output.shape[0], extractor.positions(output), samples_per_example,
                                         generator, output.device)
                rows = extractor.targets(output, index)
                _check_finite(rows, "outputs", name)
                targets[name] = (index, output.shape, rows)

            def take_values(name: str, args: tuple, output: torch.Tensor) -> None:
                index, shape, rows = targets[name]
                if output.shape != shape:
                    raise CompressionError(f"{name!r} produces {tuple(output.shape)} here but {tuple(shape)} in the "
                                           "reference network: the two must compute the same positions")
                sink(name, args, output, index, rows)

            if reference is None:
                _observe_until(network, wanted, inputs, lambda *seen: (take_targets(*seen), take_values(*seen)))
            else:
                _observe_until(reference, wanted, inputs, take_targets)
                _observe_until(network, wanted, inputs, take_values)


def collect_layer_statistics(network, nodes: Iterable[str], batches: Iterable[Any], *, reference=None,
                             samples_per_example: int = 10, append_ones: bool = False, targets_gram: bool = False,
                             seed: int = 0) -> dict[str, LayerStatistics]:
    """Running statistics of the named layers of ``network`` (a ``ReconstructedNetwork``) over ``batches`` (network
    inputs: tensors, or dicts of keyword inputs).

    For each node, ``samples_per_example`` output positions are drawn per example (seeded by ``seed``); ``X`` rows
    are the node's unfolded inputs in ``network`` at those positions, ``Y`` rows its outputs there in ``reference``
    (a network with the same node names, e.g. the uncompressed original) or, without one, in ``network`` itself.
    The forward stops after the last requested node. Raises :class:`CompressionError` for a node that is not in the
    graph or has no row handler, an empty ``batches``, or NaN/inf in the features.
    """
    extractors = _layer_extractors(network, nodes, row_extractor,
                                   "a layer whose inputs can be unfolded into rows (groups=1)")
    modules = {name: network.module_of(network.node(name)) for name in extractors}
    stats: dict[str, LayerStatistics] = {}

    def add(name: str, args: tuple, output: torch.Tensor, index: torch.Tensor, y: torch.Tensor) -> None:
        x = extractors[name].inputs(modules[name], args[0], output.shape, index)
        _check_finite(x, "inputs", name)
        if append_ones:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        if name not in stats:
            width, outputs = x.shape[1], y.shape[1]
            zeros = dict(dtype=torch.float64, device=x.device)
            stats[name] = LayerStatistics(torch.zeros(width, width, **zeros), torch.zeros(width, outputs, **zeros),
                                          torch.zeros(outputs, outputs, **zeros) if targets_gram else None)
        stats[name].update(x, y)

    _collect_rows(network, extractors, batches, reference, samples_per_example, seed, add)
    if not stats:
        raise CompressionError("no calibration batches: the loader (or trainset_ratio of it) yielded nothing")
    return stats


@dataclass
class ResponseStatistics:
    """Running moments of one layer's responses at the sampled positions: ``approx`` rows ``A`` (the layer's output
    in the network being compressed) and ``target`` rows ``T`` (its output in the reference), both n wide.
    ``aa`` = ``AᵀA``, ``ta`` = ``TᵀA``, ``tt`` = ``TᵀT``, ``sum_a``/``sum_t`` the column sums, ``count`` rows; the
    first ``keep_rows`` rows of each are also kept (for solvers that need the samples themselves, such as a
    reconstruction through a nonlinearity). All float64."""

    aa: torch.Tensor
    ta: torch.Tensor
    tt: torch.Tensor
    sum_a: torch.Tensor
    sum_t: torch.Tensor
    count: int
    keep_rows: int
    rows_a: list[torch.Tensor]
    rows_t: list[torch.Tensor]

    @classmethod
    def empty(cls, width: int, keep_rows: int, device: torch.device) -> "ResponseStatistics":
        """Zero moments for ``width`` channels."""
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)
        return cls(zeros(width, width), zeros(width, width), zeros(width, width), zeros(width), zeros(width), 0,
                   keep_rows, [], [])

    def update(self, approx: torch.Tensor, target: torch.Tensor) -> None:
        """Add paired rows (rows×n each)."""
        a, t = approx.double(), target.double()
        self.aa += a.T @ a
        self.ta += t.T @ a
        self.tt += t.T @ t
        self.sum_a += a.sum(0)
        self.sum_t += t.sum(0)
        room = self.keep_rows - sum(rows.shape[0] for rows in self.rows_a)
        if room > 0:
            self.rows_a.append(a[:room].cpu())
            self.rows_t.append(t[:room].cpu())
        self.count += a.shape[0]

    def kept_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept ``(approx, target)`` rows, each (kept×n)."""
        return torch.cat(self.rows_a), torch.cat(self.rows_t)


def response_rows_extractor(module: nn.Module) -> RowExtractor | None:
    """The handler that reads output rows of ``module`` (any ``groups``: only its output is read), or None."""
    return next((ROW_EXTRACTORS[cls] for cls in type(module).__mro__ if cls in ROW_EXTRACTORS), None)


def collect_response_statistics(network, nodes: Iterable[str], batches: Iterable[Any], *, reference=None,
                                samples_per_example: int = 10, keep_rows: int = 0,
                                seed: int = 0) -> dict[str, ResponseStatistics]:
    """Running :class:`ResponseStatistics` of the named layers' *outputs* over ``batches``: at
    ``samples_per_example`` positions per example (seeded by ``seed``), the output rows of each node in ``network``
    (``A``) and, at the same positions, in ``reference`` (``T``; ``network`` itself without one). Only n×n moments
    are kept, so this is cheaper than :func:`collect_layer_statistics` when a solver works on responses (data-driven
    low-rank decomposition). Raises :class:`CompressionError` like :func:`collect_layer_statistics`."""
    extractors = _layer_extractors(network, nodes, response_rows_extractor, "a layer whose output rows can be read")
    stats: dict[str, ResponseStatistics] = {}

    def add(name: str, args: tuple, output: torch.Tensor, index: torch.Tensor, target: torch.Tensor) -> None:
        rows = extractors[name].targets(output, index)
        _check_finite(rows, "outputs", name)
        if name not in stats:
            stats[name] = ResponseStatistics.empty(rows.shape[1], keep_rows, rows.device)
        stats[name].update(rows, target)

    _collect_rows(network, extractors, batches, reference, samples_per_example, seed, add)
    if not stats:
        raise CompressionError("no calibration batches: the loader (or trainset_ratio of it) yielded nothing")
    return stats
