"""``.vnmodel``: the binary deployment format specified in ``docs/vnmodel.md`` (header, graph JSON, tensor table with
a SHA-256 per tensor, 64-byte aligned little-endian tensor data, and a trailer with the SHA-256 of the header, the
graph and the table). Every byte is covered: by a digest, or as zero padding the reader checks."""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import torch

from ..errors import FileFormatError
from ..network import ReconstructedNetwork
from .atomic import atomic_path
from .digest import check_digest, tensor_data_digest, tensor_digest
from .graph_text import canonical_graph, parse_json
from .schema import FORMAT_VERSION, check_format_version
from .spec import network_from_spec, network_to_spec
from .tensor_data import DTYPE_CODES, DTYPES_BY_CODE, tensor_bytes, tensor_from_bytes
from .validation import check_shape

MAGIC = b"VNMODEL\0"
VERSION = FORMAT_VERSION  # the container and the graph spec share one version number
ALIGNMENT = 64
# magic, version, model_id, base height, base width, graph spec length, tensor table length, file length
_HEADER = struct.Struct("<8sIIIIQQQ")
_COUNT = struct.Struct("<I")
_NAME_LENGTH = struct.Struct("<H")
_DTYPE_RANK = struct.Struct("<BB")
_DIM = struct.Struct("<Q")
_OFFSET_SIZE = struct.Struct("<QQ")
_DIGEST_SIZE = 32
_TRAILER_PARTS = ("the header", "the graph spec", "the tensor table")
_TRAILER_SIZE = _DIGEST_SIZE * len(_TRAILER_PARTS)
_U32_MAX = 2**32 - 1


@dataclass(frozen=True)
class VnmodelHeader:
    """The fixed header of a ``.vnmodel`` file."""

    version: int
    model_id: int
    model_base_size_hw: tuple[int, int] | None
    graph_length: int
    table_length: int
    file_length: int


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    digest: str


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
    graph = canonical_graph(spec)
    table_length = _COUNT.size + sum(_entry_size(name, tensor) for name, tensor in tensors.items())
    offset = _align(_HEADER.size + len(graph) + table_length)
    table = [_COUNT.pack(len(tensors))]
    layout = []
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        table.append(_table_entry(name, tensor, offset, nbytes))
        layout.append((offset, tensor))
        offset = _align(offset + nbytes)
    header = _HEADER.pack(MAGIC, VERSION, model_id, height, width, len(graph), table_length, offset + _TRAILER_SIZE)
    table_bytes = b"".join(table)
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        writer = _PositionedWriter(stream)
        for part in (header, graph, table_bytes):
            writer.write(part)
        for data_offset, tensor in layout:
            writer.pad_to(data_offset)
            writer.write(tensor_bytes(tensor))
        writer.pad_to(offset)
        for part in (header, graph, table_bytes):
            writer.write(hashlib.sha256(part).digest())
    return os.fspath(path)


def read_vnmodel_header(path: str | os.PathLike) -> VnmodelHeader:
    """The header of a ``.vnmodel`` file (checks magic and version only)."""
    with open(path, "rb") as stream:
        return _read_header(stream.read(_HEADER.size))


def read_vnmodel(content: bytes) -> ReconstructedNetwork:
    """The network in the bytes of a ``.vnmodel`` file: the length, the digests of header, graph, table and every
    tensor, and the zero padding are all checked before anything is decoded or built."""
    data = memoryview(content)
    header = _read_header(data)
    _check_length(header, data)
    graph_end = _HEADER.size + header.graph_length
    table_end = graph_end + header.table_length
    parts = (data[:_HEADER.size], data[_HEADER.size:graph_end], data[graph_end:table_end])
    trailer = data[len(data) - _TRAILER_SIZE:]
    for i, (name, part) in enumerate(zip(_TRAILER_PARTS, parts)):
        check_digest(name, bytes(trailer[i * _DIGEST_SIZE:(i + 1) * _DIGEST_SIZE]).hex(),
                     hashlib.sha256(part).hexdigest())
    entries = _read_table(parts[2], table_end, len(data) - _TRAILER_SIZE)
    _check_padding(data, table_end, entries, len(data) - _TRAILER_SIZE)
    tensors = {}
    for entry in entries:
        raw = data[entry.offset:entry.offset + entry.nbytes]
        check_digest(f"tensor {entry.name!r}", entry.digest, tensor_data_digest(entry.name, entry.dtype, entry.shape,
                                                                                  raw))
        tensors[entry.name] = tensor_from_bytes(raw, entry.dtype, entry.shape, entry.name)
    return network_from_spec(parse_json(parts[1], "the graph spec"), tensors)


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
            + _OFFSET_SIZE.size + _DIGEST_SIZE)


def _table_entry(name: str, tensor: torch.Tensor, offset: int, nbytes: int) -> bytes:
    encoded = name.encode("utf-8")
    if tensor.dtype not in DTYPE_CODES:
        raise TypeError(f"cannot save tensor {name!r} of dtype {tensor.dtype} in a .vnmodel file")
    return b"".join([_NAME_LENGTH.pack(len(encoded)), encoded,
                     _DTYPE_RANK.pack(DTYPE_CODES[tensor.dtype], tensor.dim()),
                     *(_DIM.pack(d) for d in tensor.shape), _OFFSET_SIZE.pack(offset, nbytes),
                     bytes.fromhex(tensor_digest(name, tensor))])


class _PositionedWriter:
    """Writes to a stream while keeping the position, so that data can be padded to aligned offsets."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.position = stream, 0

    def write(self, data: bytes) -> None:
        self.stream.write(data)
        self.position += len(data)

    def pad_to(self, offset: int) -> None:
        self.write(bytes(offset - self.position))


class _Cursor:
    """Reads consecutive fields, raising ``truncated at byte N`` when one runs past the end of the data."""

    def __init__(self, data: memoryview, position: int, what: str):
        self.data, self.position, self.what = data, position, what

    def take(self, size: int, field: str) -> memoryview:
        end = self.position + size
        if end > len(self.data):
            raise FileFormatError(f"{self.what} ends at byte {len(self.data)}, but {field} needs bytes "
                                  f"{self.position} to {end}")
        chunk, self.position = self.data[self.position:end], end
        return chunk

    def unpack(self, layout: struct.Struct, field: str) -> tuple:
        return layout.unpack(self.take(layout.size, field))


def _read_header(data: bytes | memoryview) -> VnmodelHeader:
    head = bytes(data[:len(MAGIC)])
    if head != MAGIC:
        if MAGIC.startswith(head):
            raise FileFormatError(f"truncated at byte {len(head)}: the magic bytes need {len(MAGIC)}")
        raise FileFormatError(f"bad magic {head!r}: not a .vnmodel file (expected {MAGIC!r})")
    if len(data) < _HEADER.size:
        if len(data) >= 12:
            check_format_version(_COUNT.unpack_from(data, 8)[0])
        raise FileFormatError(f"truncated at byte {len(data)}: the header needs {_HEADER.size} bytes")
    _, version, model_id, height, width, graph_length, table_length, file_length = _HEADER.unpack_from(data)
    check_format_version(version)
    size = (height, width) if height or width else None
    return VnmodelHeader(version, model_id, size, graph_length, table_length, file_length)


def _check_length(header: VnmodelHeader, data: memoryview) -> None:
    if header.file_length != len(data):
        damaged = len(data) >= _HEADER.size + _TRAILER_SIZE and bytes(data[-_TRAILER_SIZE:][:_DIGEST_SIZE]) != \
            hashlib.sha256(data[:_HEADER.size]).digest()
        if len(data) < header.file_length:
            raise FileFormatError(f"truncated at byte {len(data)}: the header says the file has {header.file_length} "
                                  "bytes" + (" (or the header is damaged)" if damaged else ""))
        raise FileFormatError(f"{len(data) - header.file_length} unexpected bytes after the end the header gives"
                              + (" (or the header is damaged)" if damaged else ""))
    if _HEADER.size + header.graph_length + header.table_length + _TRAILER_SIZE > len(data):
        raise FileFormatError(f"the header is damaged: a graph of {header.graph_length} bytes and a table of "
                              f"{header.table_length} bytes do not fit in {len(data)} bytes")


def _read_table(table: memoryview, table_end: int, data_end: int) -> list[_Entry]:
    cursor = _Cursor(table, 0, "the tensor table")
    (count,) = cursor.unpack(_COUNT, "the tensor count")
    entries: list[_Entry] = []
    position = _align(table_end)
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
        shape = check_shape([cursor.unpack(_DIM, what)[0] for _ in range(rank)], f"tensor {name!r}")
        offset, nbytes = cursor.unpack(_OFFSET_SIZE, what)
        entry = _Entry(name, DTYPES_BY_CODE[code], shape, offset, nbytes, bytes(cursor.take(_DIGEST_SIZE, what)).hex())
        expected = DTYPES_BY_CODE[code].itemsize * _elements(shape)
        if nbytes != expected:
            raise FileFormatError(f"tensor {name!r} has {nbytes} bytes of data but {entry.dtype} {shape} needs "
                                  f"{expected}")
        if offset != position:
            raise FileFormatError(f"tensor {name!r} has a misplaced data offset {offset} (expected {position})")
        position = _align(offset + nbytes)
        entries.append(entry)
    if cursor.position != len(table):
        raise FileFormatError(f"the tensor table has {len(table) - cursor.position} bytes after its last entry")
    if len({entry.name for entry in entries}) != len(entries):
        raise FileFormatError("the tensor table names a tensor twice")
    if position != data_end:
        raise FileFormatError(f"the tensor data ends at byte {position}, but the trailer starts at byte {data_end}")
    return entries


def _elements(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _check_padding(data: memoryview, table_end: int, entries: list[_Entry], data_end: int) -> None:
    gaps = [(table_end, entries[0].offset if entries else data_end)]
    gaps += [(entry.offset + entry.nbytes, later.offset) for entry, later in zip(entries, entries[1:])]
    if entries:
        gaps.append((entries[-1].offset + entries[-1].nbytes, data_end))
    for start, end in gaps:
        if any(data[start:end]):
            raise FileFormatError(f"the padding between bytes {start} and {end} is not zero (the file is corrupted)")
