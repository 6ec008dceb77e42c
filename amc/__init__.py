"""The public face of the framework: ``import amc`` gives capture, the network class, pruning and loading.

The AMC wiki's names keep working: ``ReconstructedNetwork.save / save_to_json / save_to_vnmodel``.
"""
from graph.capture import capture
from graph.errors import CaptureError, FileFormatError, GraphError, PruningError, ReplayError
from graph.network import ReconstructedNetwork
from graph.pruning import mask_channels, plan_by_ratio, prune, prune_channels
from graph.serialization import load

__all__ = ["capture", "ReconstructedNetwork", "load", "prune", "prune_channels", "mask_channels", "plan_by_ratio",
           "GraphError", "CaptureError", "ReplayError", "FileFormatError", "PruningError"]
