"""A latency budget (HALP's idea, on any graph): a per-layer CPU latency table measured on this machine.

Every convolution and linear layer whose channels a unit controls is rebuilt alone at the channel counts rounding
allows (at most ``grid`` counts per unit, spread over its allowed ones; counts between them are interpolated) and
timed at batch 1 with torch or ONNX Runtime. A policy's latency is the sum of its layers' table entries plus the
rest of the network (measured whole at full size, minus the layers' full-size entries), which is taken as fixed.
Tables are cached in a JSON file keyed by layer shape, so a resumed search does not time again.
"""
from __future__ import annotations

import io
import json
import os
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from scipy.interpolate import RegularGridInterpolator

from compressors.base import CompressionError
from graph.serialization.atomic import atomic_path

from .cost import CostModel
from .units import Unit

Timer = Callable[[nn.Module, torch.Tensor, int], float]


def time_torch(module: nn.Module, example: torch.Tensor, repeats: int) -> float:
    """Median seconds of one eager forward of ``module`` on ``example`` (after a warm-up)."""
    with torch.no_grad():
        module(example)
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            module(example)
            samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def time_onnxruntime(module: nn.Module, example: torch.Tensor, repeats: int) -> float:
    """Median seconds of one ONNX Runtime (CPU, one thread) run of ``module`` exported on ``example``."""
    import onnxruntime as ort

    buffer = io.BytesIO()
    torch.onnx.export(module, (example,), buffer, input_names=["x"], dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": example.numpy()}
    session.run(None, feed)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


TIMERS: dict[str, Timer] = {"torch": time_torch, "onnxruntime": time_onnxruntime}


def resized_layer(module: nn.Module, in_channels: int, out_channels: int) -> nn.Module:
    """A fresh layer like ``module`` with other channel counts (a depthwise conv stays depthwise)."""
    if isinstance(module, nn.Linear):
        return nn.Linear(in_channels, out_channels, bias=module.bias is not None)
    groups = module.groups
    if groups > 1 and groups == module.in_channels:
        groups = in_channels
    return type(module)(in_channels, out_channels, module.kernel_size, module.stride, module.padding,
                        module.dilation, groups, module.bias is not None, module.padding_mode)


def _grid(unit: Unit, points: int) -> np.ndarray:
    """At most ``points`` of the unit's allowed counts, spread evenly, the lowest and the full count included."""
    index = np.unique(np.round(np.linspace(0, len(unit.keeps) - 1, min(points, len(unit.keeps)))).astype(int))
    return unit.keeps[index]


class LatencyModel(CostModel):
    """Seconds of one batch-1 forward on this machine's CPU, as a function of the units' kept counts."""

    unit_name = "seconds"

    def __init__(self, rnet, units: list[Unit], backend: str = "torch", cache: str | None = None, grid: int = 8,
                 repeats: int = 7):
        if backend not in TIMERS:
            raise CompressionError(f"unknown latency backend {backend!r}; choose one of {sorted(TIMERS)}")
        self.timer, self.repeats, self.backend = TIMERS[backend], repeats, backend
        self.cache_path = cache
        self.cache: dict[str, float] = {}
        if cache and os.path.exists(cache):
            with open(cache, encoding="utf-8") as handle:
                self.cache = json.load(handle)
        inputs = self._layer_inputs(rnet)
        dims = {}
        for index, unit in enumerate(units):
            for member in unit.key.members:
                if member.tensor == "weight" and member.node in inputs and member.dim in (0, 1):
                    dims[(member.node, member.dim)] = index
        names, costs, touched, base = [], [], [], []
        for name, (module, shape) in inputs.items():
            out_unit = dims.get((name, 0))
            in_unit = out_unit if _depthwise(module) else dims.get((name, 1))
            if out_unit is None and in_unit is None:
                continue
            size_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            size_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            names.append(name)
            touched.append({u for u in (in_unit, out_unit) if u is not None})
            if in_unit is not None and out_unit is not None and in_unit != out_unit:
                grid_in, grid_out = _grid(units[in_unit], grid), _grid(units[out_unit], grid)
                table = np.array([[self._measure(module, shape, int(a), int(b)) for b in grid_out] for a in grid_in])
                costs.append(_bilinear(RegularGridInterpolator((grid_in, grid_out), table), in_unit, out_unit))
                base.append(table[-1, -1])
                continue
            unit = in_unit if in_unit is not None else out_unit
            points = _grid(units[unit], grid)
            values = np.array([self._measure(module, shape, int(k) if in_unit is not None else size_in,
                                             int(k) if out_unit is not None else size_out) for k in points])
            costs.append(_linear(points, values, unit))
            base.append(values[-1])
        self._save_cache()
        touches = np.zeros((len(names), len(units)), dtype=bool)
        for row, group in enumerate(touched):
            touches[row, sorted(group)] = True
        self.costs = costs
        example = torch.ones(rnet.graph_nodes[0].meta["out"])[:1]
        whole = self._whole(rnet, example)
        super().__init__(units, names, np.array(base), touches, max(whole - float(np.sum(base)), 0.0))

    @staticmethod
    def _layer_inputs(rnet) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
        """Each conv/linear node's module and input shape at batch 1."""
        found: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}

        def observe(node, args, kwargs, output) -> None:
            module = rnet.module_of(node)
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and args and \
                    isinstance(args[0], torch.Tensor):
                found[node.name] = (module, (1, *args[0].shape[1:]))

        arguments, keywords = rnet.example_inputs()
        with torch.no_grad():
            rnet.observe(observe, *arguments, **keywords)
        return found

    def _measure(self, module: nn.Module, shape: tuple[int, ...], in_channels: int, out_channels: int) -> float:
        example_shape = list(shape)
        example_shape[-1 if isinstance(module, nn.Linear) else 1] = in_channels
        layer = resized_layer(module, in_channels, out_channels).eval()
        key = f"{self.backend}|{layer!r}|{tuple(example_shape)}"
        if key not in self.cache:
            self.cache[key] = self.timer(layer, torch.randn(example_shape), self.repeats)
        return self.cache[key]

    def _whole(self, rnet, example: torch.Tensor) -> float:
        key = f"{self.backend}|whole|{sum(p.numel() for p in rnet.parameters())}|{tuple(example.shape)}"
        if key not in self.cache:
            self.cache[key] = self.timer(rnet.eval(), example, self.repeats)
            self._save_cache()
        return self.cache[key]

    def _save_cache(self) -> None:
        if not self.cache_path:
            return
        with atomic_path(self.cache_path) as temporary:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(self.cache, handle, indent=0)

    def node_costs(self, keeps: np.ndarray) -> np.ndarray:
        if not self.costs:
            return np.zeros((len(keeps), 0))
        return np.column_stack([cost(keeps) for cost in self.costs])


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def _bilinear(table: RegularGridInterpolator, in_unit: int, out_unit: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda keeps: table(np.column_stack([keeps[:, in_unit], keeps[:, out_unit]]))


def _linear(points: np.ndarray, values: np.ndarray, unit: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda keeps: np.interp(keeps[:, unit], points, values)
