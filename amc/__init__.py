"""The public face of the framework: ``import amc`` gives capture, the network class, pruning and loading.

The AMC wiki's names keep working: the capture boundaries (``insertCaptureBoundaryStart`` ... ``getReconstructedNetwork``)
and ``ReconstructedNetwork.save / save_to_json / save_to_vnmodel / showFMLAs``.
"""
from graph import reconstructor
from graph.capture import capture
from graph.errors import CaptureError, FileFormatError, GraphError, PruningError, ReplayError
from graph.network import ReconstructedNetwork
from graph.pruning import mask_channels, plan_by_ratio, prune, prune_channels
from graph.reconstructor import (CaptureBoundary, getReconstructedNetwork, insertCaptureBoundaryEnd,
                                 insertCaptureBoundaryStart)
from graph.serialization import load
from graph.config_plan import config_expressible_plan
from graph.write_back import apply_plan

__all__ = ["capture", "ReconstructedNetwork", "load", "apply_plan", "config_expressible_plan", "prune", "prune_channels",
           "mask_channels",
           "plan_by_ratio", "reconstructor", "CaptureBoundary", "insertCaptureBoundaryStart", "insertCaptureBoundaryEnd",
           "getReconstructedNetwork",
           "GraphError", "CaptureError", "ReplayError", "FileFormatError", "PruningError"]
