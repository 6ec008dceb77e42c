"""``.pkl``: a ``torch.save`` of a plain dict (graph spec as JSON text, tensors, their digests), read ``weights_only``.

Nothing in the zip container is trusted: ``torch.load`` checks no CRC, so the graph text and every tensor carry a
SHA-256 digest (:mod:`graph.serialization.digest`), compared before anything is built.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Any

import torch

from ..errors import FileFormatError
from ..network import ReconstructedNetwork
from .atomic import atomic_path
from .digest import check_digest, check_tensor_names, graph_digest, tensor_digest
from .graph_text import canonical_graph, parse_json
from .schema import FORMAT_NAME, FORMAT_VERSION, check_format_version
from .spec import network_from_spec, network_to_spec
from .tensor_data import DTYPE_CODES

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_BYTE = b"\x80"
_KEYS = ("format", "version", "graph", "graph_sha256", "tensors", "tensor_sha256")


def matches(head: bytes) -> bool:
    """True when a file starting with ``head`` is a ``torch.save`` file (zip container or legacy pickle)."""
    return head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTOCOL_BYTE)


def save_pkl(network: ReconstructedNetwork, path: str | os.PathLike) -> str:
    """Write ``network`` to ``path`` as a weights-only loadable ``torch.save`` file; returns the path."""
    spec, tensors = network_to_spec(network)
    graph = canonical_graph(spec)
    payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "graph": graph.decode("utf-8"),
               "graph_sha256": graph_digest(graph), "tensors": tensors,
               "tensor_sha256": {name: tensor_digest(name, tensor) for name, tensor in tensors.items()}}
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return os.fspath(path)


def read_pkl(content: bytes) -> ReconstructedNetwork:
    """The network in the bytes of a ``.pkl`` file: only tensors and plain containers are unpickled
    (``weights_only=True``), and the graph and every tensor must match their digests before the network is built."""
    payload = _unpickle(content)
    if not isinstance(payload, dict) or set(payload) != set(_KEYS):
        found = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise FileFormatError(f"the pickled payload is not a saved network: expected a dict with keys {list(_KEYS)}, "
                              f"found {str(found)[:200]}")
    if payload["format"] != FORMAT_NAME:
        raise FileFormatError(f"not a saved network: format is {str(payload['format'])[:80]!r}")
    check_format_version(payload["version"])
    graph, tensors, digests = payload["graph"], payload["tensors"], payload["tensor_sha256"]
    if not isinstance(graph, str):
        raise FileFormatError("the graph spec is not JSON text")
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise FileFormatError("'tensors' is not a dict of tensors")
    if not isinstance(digests, dict):
        raise FileFormatError("'tensor_sha256' is not a dict of digests")
    graph_bytes = graph.encode("utf-8", errors="surrogatepass")
    check_digest("the graph spec", payload["graph_sha256"], graph_digest(graph_bytes))
    check_tensor_names(set(tensors), set(digests))
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if tensor.layout != torch.strided or tensor.dtype not in DTYPE_CODES:
            raise FileFormatError(f"tensor {name!r} is a {tensor.layout} {tensor.dtype} tensor, which no saved network "
                                  "holds")
        check_digest(f"tensor {name!r}", digests[name], tensor_digest(name, tensor))
        plain[name] = tensor.detach().contiguous()
    return network_from_spec(parse_json(graph_bytes, "the graph spec"), plain)


def _unpickle(content: bytes) -> Any:
    try:
        with warnings.catch_warnings():  # a damaged file makes torch warn about its pickle protocol, then fail
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - the unpickler and zip reader raise anything on a damaged file
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "weights_only" in str(error).lower() or "unsupported global" in str(error).lower():
            raise FileFormatError(f"refused to unpickle (weights_only=True allows only tensors and plain "
                                  f"containers): {message[:300]}") from None
        raise FileFormatError(f"truncated or corrupted torch file ({type(error).__name__}: {message[:300]})") from None
