"""Atomic file writes: write a temporary file beside the target, then ``os.replace`` it over the target."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in ``path``'s directory; on success it replaces ``path``, on failure it is removed."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    os.close(handle)
    os.chmod(temporary, 0o644)
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


@contextlib.contextmanager
def atomic_output_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield a path named like ``path`` inside a temporary directory beside it, for writers that may add side files
    (``model.onnx.data``); on success every file written there is moved beside ``path``, ``path`` itself last."""
    target = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(target)
    staging = tempfile.mkdtemp(dir=directory, prefix=f".{name}.")
    try:
        yield os.path.join(staging, name)
        side_files = sorted(f for f in os.listdir(staging) if f != name)
        for file_name in [*side_files, name]:
            os.replace(os.path.join(staging, file_name), os.path.join(directory, file_name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
