"""Saving and loading ``ReconstructedNetwork``s as ``.pkl``, ``.json`` and ``.vnmodel`` (see ``docs/vnmodel.md``).

``load`` picks the format from the file's first bytes, never from its name, and never executes code from the file.
"""
from __future__ import annotations

import os
from typing import Callable

from ..errors import FileFormatError
from ..network import ReconstructedNetwork
from . import json_format, pkl, vnmodel
from .json_format import save_json
from .pkl import save_pkl
from .vnmodel import read_vnmodel_header, save_vnmodel

_READERS: tuple[tuple[Callable[[bytes], bool], Callable[[str], ReconstructedNetwork]], ...] = (
    (vnmodel.matches, vnmodel.load_vnmodel),
    (pkl.matches, pkl.load_pkl),
    (json_format.matches, json_format.load_json),
)
_HEAD_SIZE = 64


def load(path: str | os.PathLike) -> ReconstructedNetwork:
    """Load a network saved by ``save_pkl``, ``save_json`` or ``save_vnmodel``, on the CPU.

    Raises :class:`~graph.errors.FileFormatError` (message starting with the path) when the file is not one of
    these formats, is truncated or corrupted, or names an op outside the allow-lists.
    """
    path = os.fspath(path)
    with open(path, "rb") as stream:
        head = stream.read(_HEAD_SIZE)
    for matches, read in _READERS:
        if matches(head):
            try:
                return read(path)
            except FileFormatError as error:
                raise FileFormatError(f"{path}: {error}") from None
    if not head:
        raise FileFormatError(f"{path}: the file is empty")
    raise FileFormatError(f"{path}: unrecognised file format (starts with {head[:8]!r}; expected a .vnmodel, "
                          "torch.save or JSON file)")


_WRITERS_BY_SUFFIX: dict[str, Callable[[ReconstructedNetwork, str], str]] = {
    ".pkl": save_pkl, ".pt": save_pkl, ".json": save_json, ".vnmodel": save_vnmodel}


def writer_for(path: str | os.PathLike) -> Callable[[ReconstructedNetwork, str], str]:
    """The save function for ``path``'s suffix; ``ValueError`` naming the known suffixes otherwise."""
    writer = _WRITERS_BY_SUFFIX.get(os.path.splitext(os.fspath(path))[1].lower())
    if writer is None:
        raise ValueError(f"cannot tell the format of {os.fspath(path)!r} from its suffix: use one of "
                         f"{', '.join(sorted(_WRITERS_BY_SUFFIX))}")
    return writer


def save(network: ReconstructedNetwork, path: str | os.PathLike) -> str:
    """Save ``network`` in the format named by ``path``'s suffix (``.pkl``, ``.json`` or ``.vnmodel``)."""
    return writer_for(path)(network, os.fspath(path))


__all__ = ["load", "save", "writer_for", "save_pkl", "save_json", "save_vnmodel", "read_vnmodel_header"]
