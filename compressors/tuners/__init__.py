"""Agents that choose per-layer compression ratios under a MACs or latency budget (the "A" in AMC): DDPG and a
genetic algorithm, with any compressor as the action; random search and a one-shot sensitivity allocator as the
baselines they must beat."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"DDPGTuner": "ddpg", "GATuner": "genetic", "RandomSearchTuner": "random_search",
            "SensitivityTuner": "sensitivity", "SearchResult": "search"}


def __getattr__(name: str) -> Any:
    """Import a tuner's module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compressors.tuners' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = list(_EXPORTS)
