"""Exceptions raised by capture, replay, analysis and serialisation."""


class GraphError(Exception):
    """Base class of every error this package raises on purpose."""


class CaptureError(GraphError):
    """The forward pass does something that cannot be replayed faithfully (names the op and the source line)."""


class ReplayError(GraphError):
    """A replay would diverge from the captured forward (for example a shape-dependent branch took another way)."""


class FileFormatError(GraphError):
    """A saved network file is truncated, corrupted or of an unknown version."""


class PruningError(GraphError):
    """A pruning plan is invalid (unknown group, out-of-range index, or a layer left with zero channels)."""
