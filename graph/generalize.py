"""Captures from examples with a size of 1: find the graph that holds at every size.

Code often compares a size that is 1 in the example with another size, and the branch it takes then holds for size 1
only: transformers compares the batch size with ``position_ids.shape[0]`` (1 for one prompt) and expands the
position ids only when they differ, so a network captured from one prompt refuses batch 3. When a guard of a capture
reads a size that was 1, :func:`generalize_size_one` traces the forward again with the size-1 dims of the inputs
grown to 2 (the example repeated along them: first the batch dim, then every size-1 dim) and replays that general
graph on the original example with the guards it fails there (the size-1 special cases) left out. When its output
equals the model's own output on the example, the general graph is kept, with the example's shapes; otherwise the
model really computes otherwise at size 1, the original capture is kept and its input nodes are marked so that
replay at another size explains it (:data:`graph.network.SPECIAL_AT_SIZE_ONE`).
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn

from .ir import Sym, captured_sizes, iter_refs
from .network import SPECIAL_AT_SIZE_ONE, ReconstructedNetwork
from .symbolic import evaluate

Inputs = tuple[tuple, dict]
TraceFunction = Callable[[nn.Module, bool, tuple, dict], Any]  # graph.capture's trace of a copy of the model


def reads_size_one(tracer) -> bool:
    """True when a guard of the trace reads a tensor size that was 1 at capture."""
    return any(1 in captured_sizes(expr, tracer.nodes) for expr, _ in tracer.guards)


def grown_inputs(inputs: Inputs, every_dim: bool) -> Inputs | None:
    """The inputs with each size-1 dim repeated to size 2: the leading (batch) dim only, or with ``every_dim`` every
    size-1 dim; ``None`` when no tensor has such a dim. Repeating keeps token ids, masks and indices valid."""
    grown = []

    def grow(tensor: torch.Tensor) -> torch.Tensor:
        dims = [d for d, size in enumerate(tensor.shape) if size == 1 and (every_dim or d == 0)]
        for dim in dims:
            tensor = torch.cat([tensor, tensor], dim)
        grown.extend(dims)
        return tensor

    result = _map_tensors(inputs, grow)
    return result if grown else None


def generalize_size_one(tracer, model: nn.Module, inputs: Inputs, trace: TraceFunction):
    """The trace to build the network from: ``tracer`` itself unless one of its guards read a size that was 1 and a
    trace at grown sizes replays the example exactly (see the module docstring)."""
    if not reads_size_one(tracer):
        return tracer
    attempts: list[Inputs] = []
    for every_dim in (False, True):
        grown = grown_inputs(inputs, every_dim)
        if grown is not None and all(_shapes(grown) != _shapes(other) for other in attempts):
            attempts.append(grown)
    if not attempts:  # the sizes of 1 are the architecture's (a pooled 1x1 map), not the example's
        return tracer
    compared = False
    for grown in attempts:
        try:
            general = trace(model, tracer.training, *grown)
        except Exception:  # the forward refuses the grown input (a dim that must stay 1): try the next growth
            continue
        if _fit_to_example(general, model, inputs):
            return general
        compared = True
    if compared:  # a general graph ran but computes otherwise at the example's size 1
        for node in tracer.nodes:
            if node.op == "input":
                node.meta[SPECIAL_AT_SIZE_ONE] = True
    return tracer


def _fit_to_example(general, model: nn.Module, inputs: Inputs) -> bool:
    """Replay the general trace on the example without the guards the example fails; when the output equals the
    model's, give the trace the example's shapes and drop those guards, and return True."""
    from .capture import describe

    network = ReconstructedNetwork.from_tracer(general, copy_modules=False)
    network.guards = {}
    needed = {ref.index for expr, _ in general.guards for ref in iter_refs(Sym(expr))}
    outputs: dict[int, Any] = {}
    shapes: dict[int, tuple] = {}
    index_of = {id(node): i for i, node in enumerate(general.nodes)}

    def observe(node, args, kwargs, output) -> None:
        index = index_of[id(node)]
        shapes[index] = describe(output)
        if index in needed:
            outputs[index] = output

    args, kwargs = inputs
    try:
        replayed = _seeded(lambda: network.observe(observe, *args, **kwargs))
    except Exception:  # the general graph cannot run at the example's sizes (it iterates over a grown dim)
        return False
    finally:
        _restore_buffers(general.root, model)
    reference = _seeded(lambda: copy.deepcopy(model).train(general.training)(*args, **kwargs))
    if not _same_output(replayed, reference):
        return False
    for node in general.nodes:
        if node.op == "input":
            value = _at_path((args, kwargs), node.meta["path"], general.signature)
            node.meta["out"] = tuple(value.shape)
    for index, shape in shapes.items():
        general.nodes[index].meta["out"] = shape
    context = {"training": general.training, "device": None}
    general.guards = {(expr, value): source for (expr, value), source in general.guards.items()
                      if _holds(expr, value, outputs, general, (args, kwargs), context)}
    general.example_inputs = inputs
    return True


def _holds(expr: Any, value: Any, outputs: dict[int, Any], general, inputs: Inputs, context: dict) -> bool:
    def tensor_of(ref):
        node = general.nodes[ref.index]
        result = _at_path(inputs, node.meta["path"], general.signature) if node.op == "input" else outputs[ref.index]
        for key in ref.path:
            result = result[key]
        return result

    return evaluate(expr, tensor_of, context) == value


def _at_path(inputs: Inputs, path: tuple, signature) -> Any:
    args, kwargs = inputs
    value: Any = signature.bind(*args, **kwargs).arguments
    for key in path:
        value = value[key]
    return value


def _seeded(run: Callable[[], Any]) -> Any:
    """Run under ``torch.no_grad`` with the RNG seeded alike each time (so dropout agrees), leaving it as it was."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        return run()


def _restore_buffers(working: nn.Module, model: nn.Module) -> None:
    with torch.no_grad():
        for original, used in zip(model.buffers(), working.buffers()):
            used.copy_(original)


def _same_output(a: Any, b: Any) -> bool:
    from .capture import iter_leaves

    first, second = list(iter_leaves(a)), list(iter_leaves(b))
    if [p for p, _ in first] != [p for p, _ in second]:
        return False
    for (_, x), (_, y) in zip(first, second):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if x.is_floating_point() or x.is_complex():
                scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
                if not torch.allclose(x, y, rtol=1e-4, atol=1e-5 * scale):
                    return False
            elif not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _shapes(inputs: Inputs) -> list[tuple]:
    shapes: list[tuple] = []
    _map_tensors(inputs, lambda tensor: shapes.append(tuple(tensor.shape)))
    return shapes


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _map_tensors(v, fn)) for k, v in value.items())
    return value
