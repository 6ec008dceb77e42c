"""The public face of the framework: ``import amc`` gives capture, the network class, pruning, write-back and
loading, and (imported on first use) the compressors, the ratio-search tuners and the trainers.

The AMC wiki's names keep working: the capture boundaries (``insertCaptureBoundaryStart`` ...
``getReconstructedNetwork``), ``ReconstructedNetwork.save / save_to_json / save_to_vnmodel / showFMLAs``, and the
compressor spellings ``ChannelPrunning`` and ``LowRankDecompostion``.
"""
from __future__ import annotations

import importlib
from typing import Any

from graph import reconstructor
from graph.capture import capture
from graph.config_plan import config_expressible_plan
from graph.errors import CaptureError, FileFormatError, GraphError, PruningError, ReplayError
from graph.network import ReconstructedNetwork
from graph.pruning import mask_channels, plan_by_ratio, prune, prune_channels
from graph.reconstructor import (CaptureBoundary, getReconstructedNetwork, insertCaptureBoundaryEnd,
                                 insertCaptureBoundaryStart)
from graph.serialization import load
from graph.write_back import apply_plan

_LAZY = {
    **{name: "compressors" for name in ("ChannelPruning", "ChannelPrunning", "LowRankDecomposition",
                                        "LowRankDecompostion", "TaylorPruning", "MagnitudePruning",
                                        "CompressionError")},
    **{name: "compressors.tuners" for name in ("DDPGTuner", "GATuner")},
    **{name: "trainers" for name in ("BaseTrainer", "BaseDistiller", "ClassificationTrainer")},
    "finetune": "trainers.finetune",
    "load_dataset": "trainers.datasets",
}


def __getattr__(name: str) -> Any:
    """Import compressors, tuners and trainers on first use (``import amc`` stays cheap)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'amc' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["capture", "ReconstructedNetwork", "load", "apply_plan", "config_expressible_plan", "prune",
           "prune_channels", "mask_channels", "plan_by_ratio", "reconstructor", "CaptureBoundary",
           "insertCaptureBoundaryStart", "insertCaptureBoundaryEnd", "getReconstructedNetwork",
           "GraphError", "CaptureError", "ReplayError", "FileFormatError", "PruningError", *_LAZY]
