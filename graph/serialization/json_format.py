"""``.json``: the graph spec, indented, followed by a ``"data"`` section with every tensor in base64."""
from __future__ import annotations

import base64
import binascii
import json
import os
import zlib
from typing import Any

import torch

from ..errors import FileFormatError
from ..network import ReconstructedNetwork
from .atomic import atomic_path
from .spec import network_from_spec, network_to_spec
from .tensor_data import DTYPES_BY_NAME, dtype_name, tensor_bytes, tensor_from_bytes


def matches(head: bytes) -> bool:
    """True when a file starting with ``head`` is a JSON object."""
    return head.lstrip().startswith(b"{")


def save_json(network: ReconstructedNetwork, path: str | os.PathLike) -> str:
    """Write ``network`` to ``path`` as human-readable JSON (graph first, tensors at the end); returns the path."""
    spec, tensors = network_to_spec(network)
    graph = json.dumps(spec, indent=2, allow_nan=False)
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as stream:
        stream.write(graph.removesuffix("\n}"))
        stream.write(',\n  "data": {')
        # One line per tensor, written by json's fast compact encoder (indenting uses the slow pure-Python one).
        for i, (name, tensor) in enumerate(tensors.items()):
            stream.write(f'{"," if i else ""}\n    {json.dumps(name)}: {json.dumps(_encode_tensor(tensor))}')
        stream.write("\n  }\n}\n")
    return os.fspath(path)


def load_json(path: str | os.PathLike) -> ReconstructedNetwork:
    """Read a ``.json`` network, checking each tensor's CRC-32."""
    with open(path, "rb") as stream:
        raw = stream.read()
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise FileFormatError(f"not UTF-8 text at byte {error.start}") from None
    except RecursionError:
        raise FileFormatError("the JSON is nested too deeply") from None
    except json.JSONDecodeError as error:
        ending = "truncated" if error.pos >= len(raw.rstrip()) else "corrupted"
        raise FileFormatError(f"{ending} JSON at byte {error.pos} (line {error.lineno}, column {error.colno}): "
                              f"{error.msg}") from None
    if not isinstance(document, dict):
        raise FileFormatError("the file is not a JSON object")
    if "data" not in document:
        raise FileFormatError("missing key 'data' (the tensors)")
    data = document.pop("data")
    if not isinstance(data, dict):
        raise FileFormatError("'data' is not a JSON object")
    tensors = {name: _decode_tensor(name, entry) for name, entry in data.items()}
    return network_from_spec(document, tensors)


def _encode_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    raw = tensor_bytes(tensor)
    return {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "crc32": zlib.crc32(raw),
            "base64": base64.b64encode(raw).decode("ascii")}


def _decode_tensor(name: str, entry: Any) -> torch.Tensor:
    if not isinstance(entry, dict):
        raise FileFormatError(f"tensor {name!r} is not a JSON object")
    for key in ("dtype", "shape", "crc32", "base64"):
        if key not in entry:
            raise FileFormatError(f"missing key {key!r} for tensor {name!r}")
    dtype = DTYPES_BY_NAME.get(entry["dtype"])
    if dtype is None:
        raise FileFormatError(f"tensor {name!r} has an unknown dtype {entry['dtype']!r}")
    shape = entry["shape"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise FileFormatError(f"tensor {name!r} has a malformed shape {shape!r}")
    try:
        raw = base64.b64decode(entry["base64"], validate=True)
    except (binascii.Error, TypeError, ValueError) as error:
        raise FileFormatError(f"tensor {name!r} has malformed base64 data: {error}") from None
    if zlib.crc32(raw) != entry["crc32"]:
        raise FileFormatError(f"checksum mismatch for tensor {name!r}: its data is corrupted")
    return tensor_from_bytes(raw, dtype, tuple(shape), name)
