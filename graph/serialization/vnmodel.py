"""``.vnmodel``: the binary deployment format specified in ``docs/vnmodel.md`` (magic, header, graph JSON, tensor
table, 64-byte aligned little-endian tensor data, trailing CRC-32)."""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import torch

from ..errors import FileFormatError
from ..network import ReconstructedNetwork
from .atomic import atomic_path
from .spec import network_from_spec, network_to_spec
from .tensor_data import DTYPE_CODES, DTYPES_BY_CODE, tensor_bytes, tensor_from_bytes

MAGIC = b"VNMODEL\0"
VERSION = 1
ALIGNMENT = 64
_HEADER = struct.Struct("<8sIIIIQ")  # magic, version, model_id, base height, base width, graph spec length
_COUNT = struct.Struct("<I")
_NAME_LENGTH = struct.Struct("<H")
_DTYPE_RANK = struct.Struct("<BB")
_DIM = struct.Struct("<Q")
_OFFSET_SIZE = struct.Struct("<QQ")
_CHECKSUM = struct.Struct("<I")
_U32_MAX = 2**32 - 1


@dataclass(frozen=True)
class VnmodelHeader:
    """The fixed header of a ``.vnmodel`` file."""

    version: int
    model_id: int
    model_base_size_hw: tuple[int, int] | None


def matches(head: bytes) -> bool:
    """True when a file starting with ``head`` is a ``.vnmodel`` file (or one truncated inside its magic bytes)."""
    return head.startswith(MAGIC) or (0 < len(head) < len(MAGIC) and MAGIC.startswith(head))


def save_vnmodel(network: ReconstructedNetwork, path: str | os.PathLike,
                 model_base_size_hw: tuple[int, int] | None = None, model_id: int = 0) -> str:
    """Write ``network`` to ``path`` in the ``.vnmodel`` format; returns the path.

    ``model_base_size_hw`` is the (height, width) the model is meant to run at (stored as 0, 0 when ``None``);
    ``model_id`` is a u32 chosen by the caller.
    """
    height, width = _check_header_values(model_base_size_hw, model_id)
    spec, tensors = network_to_spec(network)
    graph = json.dumps(spec, separators=(",", ":"), allow_nan=False).encode("utf-8")
    table_size = _COUNT.size + sum(_entry_size(name, tensor) for name, tensor in tensors.items())
    offset = _align(_HEADER.size + len(graph) + table_size)
    table = [_COUNT.pack(len(tensors))]
    layout = []
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        table.append(_table_entry(name, tensor, offset, nbytes))
        layout.append((offset, tensor))
        offset = _align(offset + nbytes)
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        writer = _ChecksummedWriter(stream)
        writer.write(_HEADER.pack(MAGIC, VERSION, model_id, height, width, len(graph)))
        writer.write(graph)
        writer.write(b"".join(table))
        for data_offset, tensor in layout:
            writer.pad_to(data_offset)
            writer.write(tensor_bytes(tensor))
        writer.pad_to(offset)
        stream.write(_CHECKSUM.pack(writer.crc))
    return os.fspath(path)


def read_vnmodel_header(path: str | os.PathLike) -> VnmodelHeader:
    """The header of a ``.vnmodel`` file (checks magic and version only)."""
    with open(path, "rb") as stream:
        return _read_header(stream.read(_HEADER.size))[0]


def load_vnmodel(path: str | os.PathLike) -> ReconstructedNetwork:
    """Read a ``.vnmodel`` network, checking structure, size and checksum before building anything."""
    with open(path, "rb") as stream:
        data = memoryview(stream.read())
    header, graph_length = _read_header(data)
    cursor = _Cursor(data, _HEADER.size)
    graph = cursor.take(graph_length, "the graph spec")
    entries = _read_table(cursor)
    end = _align(max([cursor.position] + [offset + nbytes for _, _, _, offset, nbytes in entries]))
    if len(data) < end + _CHECKSUM.size:
        raise FileFormatError(f"truncated at byte {len(data)}: the tensor table needs {end + _CHECKSUM.size} bytes")
    if len(data) > end + _CHECKSUM.size:
        raise FileFormatError(f"{len(data) - end - _CHECKSUM.size} unexpected bytes after the checksum")
    stored, computed = _CHECKSUM.unpack_from(data, end)[0], zlib.crc32(data[:end])
    if stored != computed:
        raise FileFormatError(f"checksum mismatch: the file stores CRC-32 {stored:#010x} but its bytes give "
                              f"{computed:#010x} (the file is corrupted)")
    try:
        spec = json.loads(bytes(graph).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise FileFormatError(f"the graph spec is not valid UTF-8 JSON: {error!r}") from None
    tensors = {name: tensor_from_bytes(data[offset:offset + nbytes], dtype, shape, name)
               for name, dtype, shape, offset, nbytes in entries}
    return network_from_spec(spec, tensors)


def _check_header_values(model_base_size_hw: tuple[int, int] | None, model_id: int) -> tuple[int, int]:
    if not isinstance(model_id, int) or isinstance(model_id, bool) or not 0 <= model_id <= _U32_MAX:
        raise ValueError(f"model_id must be an integer in [0, 2**32), got {model_id!r}")
    if model_base_size_hw is None:
        return 0, 0
    size = tuple(model_base_size_hw)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= _U32_MAX for s in size):
        raise ValueError(f"model_base_size_hw must be (height, width), positive integers; got {model_base_size_hw!r}")
    return size


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _entry_size(name: str, tensor: torch.Tensor) -> int:
    return (_NAME_LENGTH.size + len(name.encode("utf-8")) + _DTYPE_RANK.size + _DIM.size * tensor.dim()
            + _OFFSET_SIZE.size)


def _table_entry(name: str, tensor: torch.Tensor, offset: int, nbytes: int) -> bytes:
    encoded = name.encode("utf-8")
    if tensor.dtype not in DTYPE_CODES:
        raise TypeError(f"cannot save tensor {name!r} of dtype {tensor.dtype} in a .vnmodel file")
    return b"".join([_NAME_LENGTH.pack(len(encoded)), encoded,
                     _DTYPE_RANK.pack(DTYPE_CODES[tensor.dtype], tensor.dim()),
                     *(_DIM.pack(d) for d in tensor.shape), _OFFSET_SIZE.pack(offset, nbytes)])


class _ChecksummedWriter:
    """Writes to a stream while keeping the CRC-32 and the position of everything written."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.crc, self.position = stream, 0, 0

    def write(self, data: bytes) -> None:
        self.stream.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.position += len(data)

    def pad_to(self, offset: int) -> None:
        self.write(bytes(offset - self.position))


class _Cursor:
    """Reads consecutive fields, raising ``truncated at byte N`` when one runs past the end of the data."""

    def __init__(self, data: memoryview, position: int):
        self.data, self.position = data, position

    def take(self, size: int, what: str) -> memoryview:
        end = self.position + size
        if end > len(self.data):
            raise FileFormatError(f"truncated at byte {len(self.data)}: {what} needs bytes {self.position} to {end}")
        chunk, self.position = self.data[self.position:end], end
        return chunk

    def unpack(self, layout: struct.Struct, what: str) -> tuple:
        return layout.unpack(self.take(layout.size, what))


def _read_header(data: bytes | memoryview) -> tuple[VnmodelHeader, int]:
    head = bytes(data[:len(MAGIC)])
    if head != MAGIC:
        if MAGIC.startswith(head):
            raise FileFormatError(f"truncated at byte {len(head)}: the magic bytes need {len(MAGIC)}")
        raise FileFormatError(f"bad magic {head!r}: not a .vnmodel file (expected {MAGIC!r})")
    _, version, model_id, height, width, graph_length = _Cursor(memoryview(data), 0).unpack(
        _HEADER, "the header")
    if version != VERSION:
        raise FileFormatError(f"unknown format version {version} (this reader knows version {VERSION})")
    size = (height, width) if height or width else None
    return VnmodelHeader(version, model_id, size), graph_length


def _read_table(cursor: _Cursor) -> list[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
    (count,) = cursor.unpack(_COUNT, "the tensor count")
    entries = []
    previous_end = None
    for index in range(count):
        what = f"tensor table entry {index}"
        (name_length,) = cursor.unpack(_NAME_LENGTH, what)
        try:
            name = bytes(cursor.take(name_length, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise FileFormatError(f"{what}: the name is not UTF-8") from None
        code, rank = cursor.unpack(_DTYPE_RANK, what)
        if code not in DTYPES_BY_CODE:
            raise FileFormatError(f"tensor {name!r} has an unknown dtype code {code}")
        shape = tuple(cursor.unpack(_DIM, what)[0] for _ in range(rank))
        offset, nbytes = cursor.unpack(_OFFSET_SIZE, what)
        entries.append((name, DTYPES_BY_CODE[code], shape, offset, nbytes))
        if offset % ALIGNMENT or (previous_end is not None and offset < previous_end):
            raise FileFormatError(f"tensor {name!r} has a misplaced data offset {offset}")
        previous_end = offset + nbytes
    names = [entry[0] for entry in entries]
    if len(set(names)) != len(names):
        raise FileFormatError("the tensor table names a tensor twice")
    if entries and entries[0][3] < cursor.position:
        raise FileFormatError(f"tensor {entries[0][0]!r} data offset {entries[0][3]} overlaps the tensor table")
    return entries

