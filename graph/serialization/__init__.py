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

_READERS: tuple[tuple[str, Callable[[bytes], bool], Callable[..., ReconstructedNetwork]], ...] = (
    ("vnmodel", vnmodel.matches, vnmodel.read_vnmodel),
    ("pkl", pkl.matches, pkl.read_pkl),
    ("json", json_format.matches, json_format.read_json),
)


def load(path: str | os.PathLike, *, unchecked: bool = False) -> ReconstructedNetwork:
    """Load a network saved by ``save_pkl``, ``save_json`` or ``save_vnmodel``, on the CPU.

    Every part of the file is checked against its SHA-256 digest, and the graph spec against its schema, before
    anything is built. ``unchecked=True`` skips the digests of a ``.json`` file edited by hand on purpose (the schema
    and every other check still apply); the binary formats cannot be loaded unchecked. Raises
    :class:`~graph.errors.FileFormatError` (message starting with the path, then the damaged part and what is wrong)
    when the file is not one of these formats, is truncated, corrupted or malformed, or names an op outside the
    allow-lists; ``FileNotFoundError`` and ``PermissionError`` pass through.
    """
    path = os.fspath(path)
    with open(path, "rb") as stream:
        return load_bytes(stream.read(), path, unchecked=unchecked)


def load_bytes(content: bytes, name: str = "<bytes>", *, unchecked: bool = False) -> ReconstructedNetwork:
    """:func:`load` for the bytes of a saved network already in memory; ``name`` starts every error message."""
    for kind, matches, read in _READERS:
        if matches(content[:64]):
            if unchecked and kind != "json":
                raise ValueError(f"{name}: only .json files can be loaded unchecked (this is a .{kind} file)")
            try:
                return read(content, unchecked=True) if unchecked else read(content)
            except FileFormatError as error:
                raise FileFormatError(f"{name}: {error}") from None
    if not content:
        raise FileFormatError(f"{name}: the file is empty")
    raise FileFormatError(f"{name}: unrecognised file format (starts with {content[:8]!r}; expected a .vnmodel, "
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


__all__ = ["load", "load_bytes", "save", "writer_for", "save_pkl", "save_json", "save_vnmodel", "read_vnmodel_header"]
