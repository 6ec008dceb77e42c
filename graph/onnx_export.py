"""Export a ``ReconstructedNetwork`` to ONNX.

The network's replay is a plain Python loop over real tensor ops, which is exactly what ``torch.onnx.export``'s
tracing exporter records; sizes that replay recomputes from tensor shapes become ONNX ``Shape`` ops, so the batch
dimension stays dynamic. That exporter (``dynamo=False``) is the default because it is an order of magnitude faster
here than the ``torch.export``-based one (about 1.5 s against 10-20 s for resnet18 / mobilenet_v2 at 64x64 on two CPU
cores) and gives the same outputs; torch has deprecated it, so ``dynamo=True`` selects the newer exporter.

Guards are not part of the ONNX graph: the exported model is valid for inputs on which the captured forward would
take the same branches (the replay at the example inputs checks them once).
"""
from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from .capture import iter_tensors
from .network import ReconstructedNetwork
from .serialization.atomic import atomic_output_directory

BATCH_AXIS_NAME = "batch"


def example_inputs_from_meta(network: ReconstructedNetwork) -> tuple[torch.Tensor, ...]:
    """Positional inputs of the captured shapes and dtypes: seeded normal noise for floats, zeros for the rest.

    Raises ``ValueError`` when the forward needs something these cannot provide (a nested tensor argument or a
    required non-tensor argument); pass example inputs explicitly then.
    """
    by_name: dict[str, Any] = {}
    generator = torch.Generator().manual_seed(0)
    for node in network.input_nodes:
        path = node.meta["path"]
        if len(path) != 1:
            raise ValueError(f"input {node.name} is nested in argument {path[0]!r}; pass example inputs explicitly")
        dtype = getattr(torch, node.meta.get("dtype", "float32"))
        shape = node.meta["out"]
        by_name[path[0]] = (torch.randn(shape, generator=generator, dtype=dtype) if dtype.is_floating_point
                            else torch.zeros(shape, dtype=dtype))
    inputs = []
    for parameter in network.signature.parameters.values():
        if parameter.name in by_name and parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            inputs.append(by_name.pop(parameter.name))
        elif parameter.default is inspect.Parameter.empty and parameter.kind not in (parameter.VAR_POSITIONAL,
                                                                                     parameter.VAR_KEYWORD):
            raise ValueError(f"the forward argument {parameter.name!r} cannot be made from the captured shapes; "
                             "pass example inputs explicitly")
    if by_name:
        raise ValueError(f"inputs {sorted(by_name)} are keyword-only; pass example inputs explicitly")
    return tuple(inputs)


def export_onnx(network: ReconstructedNetwork, path: str | os.PathLike, *example_inputs: Any,
                dynamic_batch: bool = True, opset: int | None = None, dynamo: bool = False) -> str:
    """Write ``network`` as an ONNX model to ``path`` (atomically) and return the path.

    ``example_inputs`` are the forward's positional arguments (made up from the captured shapes when omitted).
    With ``dynamic_batch`` the first dimension of every tensor input is the symbolic axis ``batch``. ``opset``
    picks the ONNX opset (torch's default when ``None``); ``dynamo=True`` uses the ``torch.export``-based exporter.
    """
    inputs = example_inputs or example_inputs_from_meta(network)
    tensor_inputs = [tensor for _, tensor in iter_tensors(tuple(inputs))]
    input_names = [f"input_{i}" for i in range(len(tensor_inputs))]
    with torch.no_grad():
        outputs = network(*inputs)
    output_names = [f"output_{i}" for i, _ in enumerate(iter_tensors(outputs))]
    options: dict[str, Any] = {"opset_version": opset, "input_names": input_names, "output_names": output_names}
    if dynamo:
        options["dynamic_shapes"] = (_batch_shapes(inputs),) if dynamic_batch else None
    elif dynamic_batch:
        options["dynamic_axes"] = {name: {0: BATCH_AXIS_NAME} for name, tensor in zip(input_names, tensor_inputs)
                                   if tensor.dim() > 0}
    with atomic_output_directory(path) as staging_path:
        torch.onnx.export(network, tuple(inputs), staging_path, dynamo=dynamo, **options)
    return os.fspath(path)


def _batch_shapes(inputs: Any) -> Any:
    """``dynamic_shapes`` for the exporter: dimension 0 of every tensor is the one shared ``batch`` dimension."""
    batch = torch.export.Dim(BATCH_AXIS_NAME)

    def shapes(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {0: batch} if value.dim() > 0 else None
        if isinstance(value, (tuple, list)):
            return type(value)(shapes(item) for item in value)
        if isinstance(value, dict):
            return {key: shapes(item) for key, item in value.items()}
        return None

    return shapes(inputs)
