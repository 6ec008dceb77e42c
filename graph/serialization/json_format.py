"""``.json``: the graph spec, indented, then a ``"data"`` section with every tensor in base64, then the graph's digest.

Each tensor entry carries the SHA-256 of its name, dtype, shape and bytes; ``"graph_sha256"`` is the SHA-256 of the
spec's canonical JSON (:func:`~graph.serialization.graph_text.canonical_graph`), so re-indenting the file keeps it
valid but changing any value does not. A file edited by hand on purpose loads with ``unchecked=True``, which skips
the digests (never the default); everything else is still validated.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

import torch

from ..errors import FileFormatError
from ..network import ReconstructedNetwork
from .atomic import atomic_path
from .digest import check_digest, graph_digest, tensor_data_digest
from .graph_text import canonical_graph, parse_json
from .spec import network_from_spec, network_to_spec
from .tensor_data import DTYPES_BY_NAME, dtype_name, tensor_bytes, tensor_from_bytes
from .validation import check_shape

_TENSOR_KEYS = ("dtype", "shape", "sha256", "base64")


def matches(head: bytes) -> bool:
    """True when a file starting with ``head`` is a JSON object."""
    return head.lstrip().startswith(b"{")


def save_json(network: ReconstructedNetwork, path: str | os.PathLike) -> str:
    """Write ``network`` to ``path`` as human-readable JSON (graph first, tensors, then the graph digest)."""
    spec, tensors = network_to_spec(network)
    graph = json.dumps(spec, indent=2, ensure_ascii=False, allow_nan=False)
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as stream:
        stream.write(graph.removesuffix("\n}"))
        stream.write(',\n  "data": {')
        # One line per tensor, written by json's fast compact encoder (indenting uses the slow pure-Python one).
        for i, (name, tensor) in enumerate(tensors.items()):
            stream.write(f'{"," if i else ""}\n    {json.dumps(name)}: {json.dumps(_encode_tensor(name, tensor))}')
        stream.write(f'\n  }},\n  "graph_sha256": "{graph_digest(canonical_graph(spec))}"\n}}\n')
    return os.fspath(path)


def read_json(content: bytes, unchecked: bool = False) -> ReconstructedNetwork:
    """The network in the bytes of a ``.json`` file, checking the graph's and every tensor's digest unless
    ``unchecked``."""
    document = parse_json(content, "the JSON document")
    if not isinstance(document, dict):
        raise FileFormatError("the file is not a JSON object")
    for key in ("data", "graph_sha256"):
        if key not in document:
            raise FileFormatError(f"missing key {key!r} ({'the tensors' if key == 'data' else 'the graph digest'})")
    data, stored_digest = document.pop("data"), document.pop("graph_sha256")
    if not isinstance(data, dict):
        raise FileFormatError("'data' is not a JSON object")
    if not unchecked:
        check_digest("the graph spec", stored_digest, graph_digest(canonical_graph(document)))
    tensors = {name: _decode_tensor(name, entry, unchecked) for name, entry in data.items()}
    return network_from_spec(document, tensors)


def _encode_tensor(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    raw = tensor_bytes(tensor)
    return {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
            "sha256": tensor_data_digest(name, tensor.dtype, tuple(tensor.shape), raw),
            "base64": base64.b64encode(raw).decode("ascii")}


def _decode_tensor(name: str, entry: Any, unchecked: bool) -> torch.Tensor:
    where = f"tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != set(_TENSOR_KEYS):
        raise FileFormatError(f"{where} is not an object with keys {list(_TENSOR_KEYS)}")
    dtype = DTYPES_BY_NAME.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise FileFormatError(f"{where} has an unknown dtype {str(entry['dtype'])[:40]!r}")
    shape = check_shape(entry["shape"], where)
    if not isinstance(entry["base64"], str):
        raise FileFormatError(f"{where} has malformed base64 data")
    try:
        raw = base64.b64decode(entry["base64"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise FileFormatError(f"{where} has malformed base64 data: {error}") from None
    if not unchecked:
        check_digest(where, entry["sha256"], tensor_data_digest(name, dtype, shape, raw))
    return tensor_from_bytes(raw, dtype, shape, name)
