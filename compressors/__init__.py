"""Compressors that rewrite a captured network, all on one base (:class:`compressors.base.Compressor`):
collect statistics from data, solve for what to keep, rewrite the graph.

``from compressors import ChannelPruning, LowRankDecomposition, TaylorPruning, MagnitudePruning``; the AMC wiki's
spellings ``ChannelPrunning`` and ``LowRankDecompostion`` are aliases. The ratio-search agents live in
:mod:`compressors.tuners`.
"""
from __future__ import annotations

import importlib
from typing import Any

from .base import CompressionError, Compressor

_EXPORTS = {
    "ChannelPruning": "channel_pruning", "ChannelPrunning": "channel_pruning",
    "LowRankDecomposition": "low_rank", "LowRankDecompostion": "low_rank",
    "TaylorPruning": "taylor", "MagnitudePruning": "magnitude",
}


def __getattr__(name: str) -> Any:
    """Import a compressor's module on first use (``import compressors`` stays cheap)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compressors' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = ["Compressor", "CompressionError", *_EXPORTS]
