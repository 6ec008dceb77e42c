"""Graph capture, the ``ReconstructedNetwork`` IR and everything that reads or rewrites it."""
from .capture import capture
from .errors import CaptureError, FileFormatError, GraphError, PruningError, ReplayError
from .network import ReconstructedNetwork
from .pruning import mask_channels, plan_by_ratio, prune, prune_channels
from .serialization import load

__all__ = ["capture", "ReconstructedNetwork", "load", "prune", "prune_channels", "mask_channels", "plan_by_ratio",
           "GraphError", "CaptureError", "ReplayError", "FileFormatError", "PruningError"]
