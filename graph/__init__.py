"""Graph capture, the ``ReconstructedNetwork`` IR and everything that reads or rewrites it."""
from .capture import capture
from .errors import CaptureError, FileFormatError, GraphError, PruningError, ReplayError
from .network import ReconstructedNetwork

__all__ = ["capture", "ReconstructedNetwork", "GraphError", "CaptureError", "ReplayError", "FileFormatError",
           "PruningError"]
