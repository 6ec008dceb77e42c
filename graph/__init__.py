"""Graph capture, the ``ReconstructedNetwork`` IR and everything that reads or rewrites it."""
from .capture import capture
from .errors import CaptureError, FileFormatError, GraphError, PruningError, ReplayError
from .network import ReconstructedNetwork
from .pruning import mask_channels, plan_by_ratio, prune, prune_channels
from .serialization import load
from .config_plan import config_expressible_plan
from .write_back import apply_plan

__all__ = ["capture", "ReconstructedNetwork", "load", "apply_plan", "config_expressible_plan", "prune", "prune_channels",
           "mask_channels",
           "plan_by_ratio",
           "GraphError", "CaptureError", "ReplayError", "FileFormatError", "PruningError"]
