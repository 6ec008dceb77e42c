"""Tensors as raw little-endian bytes, and the dtype codes of ``docs/vnmodel.md``."""
from __future__ import annotations

import sys

import torch

from ..errors import FileFormatError

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.int8: 4, torch.uint8: 5,
    torch.int16: 6, torch.int32: 7, torch.int64: 8, torch.bool: 9, torch.complex64: 10, torch.complex128: 11,
    torch.uint16: 12, torch.uint32: 13, torch.uint64: 14,
}
DTYPES_BY_CODE: dict[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
DTYPES_BY_NAME: dict[str, torch.dtype] = {str(dtype).removeprefix("torch."): dtype for dtype in DTYPE_CODES}

if sys.byteorder != "little":
    raise ImportError("graph.serialization stores tensors as little-endian bytes and supports little-endian hosts only")


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``; raises ``TypeError`` for dtypes the formats do not store."""
    if dtype not in DTYPE_CODES:
        raise TypeError(f"cannot save tensors of dtype {dtype}")
    return str(dtype).removeprefix("torch.")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw C-order bytes of a tensor (moved to the CPU and made contiguous first, copied only if needed)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_from_bytes(data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """A new CPU tensor of ``dtype`` and ``shape`` holding ``data``; :class:`FileFormatError` if sizes disagree."""
    count = 1
    for dim in shape:
        count *= dim
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise FileFormatError(f"tensor {name!r} has {len(data)} bytes of data but {dtype} {tuple(shape)} needs "
                              f"{expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
