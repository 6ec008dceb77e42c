"""``.pkl``: a ``torch.save`` of ``{"spec": graph spec, "tensors": {name: tensor}}``, read ``weights_only``."""
from __future__ import annotations

import os
import pickle
import zipfile

import torch

from ..errors import FileFormatError
from ..network import ReconstructedNetwork
from .atomic import atomic_path
from .spec import network_from_spec, network_to_spec

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_BYTE = b"\x80"


def matches(head: bytes) -> bool:
    """True when a file starting with ``head`` is a ``torch.save`` file (zip container or legacy pickle)."""
    return head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTOCOL_BYTE)


def save_pkl(network: ReconstructedNetwork, path: str | os.PathLike) -> str:
    """Write ``network`` to ``path`` as a weights-only loadable ``torch.save`` file; returns the path."""
    spec, tensors = network_to_spec(network)
    with atomic_path(path) as temporary:
        torch.save({"spec": spec, "tensors": tensors}, temporary)
    return os.fspath(path)


def load_pkl(path: str | os.PathLike) -> ReconstructedNetwork:
    """Read a ``.pkl`` network; only tensors and plain containers are unpickled (``weights_only=True``)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise FileFormatError("refused to unpickle (weights_only=True allows only tensors and plain containers): "
                              f"{str(error).splitlines()[0]}") from None
    except (FileNotFoundError, PermissionError):
        raise
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise FileFormatError(f"truncated or corrupted torch file: {error}") from None
    if not isinstance(payload, dict):
        raise FileFormatError(f"expected a dict with 'spec' and 'tensors', found {type(payload).__name__}")
    for key in ("spec", "tensors"):
        if key not in payload:
            raise FileFormatError(f"missing key {key!r}")
    if not isinstance(payload["tensors"], dict):
        raise FileFormatError("'tensors' is not a dict of tensors")
    return network_from_spec(payload["spec"], payload["tensors"])
