"""Honest size accounting for sparse (magnitude-pruned) networks: per-layer sparsity, dense bytes, compressed
(zip) bytes and CSR bytes, and a CSR export.

A zeroed weight still costs its bytes in a dense file; what sparsity buys on disk is what a compressor or a sparse
format makes of it, and both numbers are reported side by side.
"""
from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from graph.serialization.atomic import atomic_path

from .magnitude import effective_weight, weight_nodes


@dataclass
class SparsityRow:
    """One weight node: its entries, how many are zero, and what it costs dense, zipped and as CSR."""

    node: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    dense_bytes: int
    zip_bytes: int
    csr_bytes: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    """Per-layer rows and totals; ``str()`` prints the table."""

    rows: list[SparsityRow]

    def total(self, field: str) -> int:
        """Sum of one integer column (``numel``, ``zeros``, ``dense_bytes``, ``zip_bytes``, ``csr_bytes``)."""
        return sum(getattr(row, field) for row in self.rows)

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over all rows."""
        return self.total("zeros") / max(self.total("numel"), 1)

    def __str__(self) -> str:
        lines = [f"{'node':30s} {'shape':>18s} {'sparsity':>9s} {'dense B':>10s} {'zip B':>10s} {'CSR B':>10s}"]
        for row in self.rows:
            lines.append(f"{row.node[:30]:30s} {str(row.shape):>18s} {row.sparsity:9.3f} {row.dense_bytes:10,d} "
                         f"{row.zip_bytes:10,d} {row.csr_bytes:10,d}")
        lines.append(f"{'total':30s} {'':>18s} {self.sparsity:9.3f} {self.total('dense_bytes'):10,d} "
                     f"{self.total('zip_bytes'):10,d} {self.total('csr_bytes'):10,d}")
        return "\n".join(lines)


def csr_bytes(matrix: torch.Tensor) -> int:
    """Bytes of a 2-d matrix in CSR: values, int32 column indices and int32 row pointers."""
    nonzeros = int(torch.count_nonzero(matrix))
    return nonzeros * (matrix.element_size() + 4) + (matrix.shape[0] + 1) * 4


def sparsity_report(network: nn.Module) -> SparsityReport:
    """Per conv/linear node of a captured network: sparsity of its effective weight, dense bytes, ``zlib``
    level-9 bytes of the raw weight, and CSR bytes of the weight as a (rows x everything-else) matrix."""
    rows = []
    for name, module in weight_nodes(network).items():
        weight = effective_weight(module).contiguous().cpu()
        matrix = weight.reshape(weight.shape[0], -1)
        raw = weight.numpy().tobytes()
        rows.append(SparsityRow(name, tuple(weight.shape), weight.numel(), int((weight == 0).sum()), len(raw),
                                len(zlib.compress(raw, 9)), csr_bytes(matrix)))
    return SparsityReport(rows)


def export_csr(network: nn.Module, path: str | os.PathLike) -> str:
    """Write every conv/linear weight as a ``torch.sparse_csr`` matrix (rows x rest, with its original shape) to a
    ``torch.save`` file, atomically; returns the path. Load with ``torch.load(path, weights_only=True)``."""
    tensors = {}
    for name, module in weight_nodes(network).items():
        weight = effective_weight(module).cpu()
        tensors[name] = {"shape": list(weight.shape),
                         "csr": weight.reshape(weight.shape[0], -1).to_sparse_csr()}
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(buffer.getvalue())
    return os.fspath(path)
