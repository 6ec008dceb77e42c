"""SHA-256 digests of the two parts of a saved network: the graph spec and each stored tensor.

Every format stores a digest of its graph spec and one per tensor, and checks them all before anything is built, so
a change to any byte that matters is detected and reported by part (``the graph spec``, ``tensor 'nodes.conv.weight'``).
A tensor's digest covers its name, dtype and shape as well as its bytes, so a renamed or reshaped tensor is caught too.
"""
from __future__ import annotations

import hashlib
import re

import torch

from ..errors import FileFormatError
from .tensor_data import dtype_name, tensor_bytes

ALGORITHM = "sha256"
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def graph_digest(graph: bytes) -> str:
    """The hex SHA-256 of the graph spec's bytes (the exact bytes in the file, or its canonical JSON)."""
    return hashlib.sha256(graph).hexdigest()


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """The hex SHA-256 of a tensor's name, dtype, shape and raw little-endian C-order bytes."""
    return tensor_data_digest(name, tensor.dtype, tuple(tensor.shape), tensor_bytes(tensor))


def tensor_data_digest(name: str, dtype: torch.dtype, shape: tuple[int, ...], data: bytes | memoryview) -> str:
    """:func:`tensor_digest` from the parts as they lie in a file, without building the tensor first."""
    digest = hashlib.sha256(f"{name}\0{dtype_name(dtype)}\0{list(shape)}\0".encode("utf-8"))
    digest.update(data)
    return digest.hexdigest()


def check_digest(part: str, stored: object, computed: str) -> None:
    """Raise :class:`FileFormatError` naming ``part`` when ``stored`` is not the digest ``computed`` from the file."""
    if not isinstance(stored, str) or not _HEX_DIGEST.fullmatch(stored):
        raise FileFormatError(f"{part}: its stored digest is malformed ({str(stored)[:80]!r}; expected 64 lowercase "
                              "hex digits of SHA-256)")
    if stored != computed:
        raise FileFormatError(f"{part} is damaged: its SHA-256 digest is {computed[:16]}... but the file stores "
                              f"{stored[:16]}... (the file is corrupted)")


def check_tensor_names(stored: set[str], digested: set[str]) -> None:
    """Refuse a file whose tensors and tensor digests do not name the same tensors."""
    undigested, unstored = sorted(stored - digested), sorted(digested - stored)
    if undigested:
        raise FileFormatError(f"tensor {undigested[0]!r} has no digest (the file is corrupted)")
    if unstored:
        raise FileFormatError(f"tensor {unstored[0]!r} has a digest but no data (the file is corrupted)")
