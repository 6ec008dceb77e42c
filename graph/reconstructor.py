"""The AMC wiki's capture-boundary API: mark the start and end of a forward of the user's own network.

::

    reconstructor.insertCaptureBoundaryStart(network)
    out = network(torch.rand(1, 3, 32, 32))
    reconstructor.insertCaptureBoundaryEnd()
    reconstructed_network, graph = reconstructor.getReconstructedNetwork(ifDraw=True, drawPath="origin_net")

The boundaries install a :class:`~graph.capture.Tracer` on the network itself (forward hooks, a torch function mode)
and remove every trace of it at the end; the forward in between runs as the user wrote it and its output is theirs.
The reconstructed network holds copies of the modules, so later changes to either side do not leak into the other.
:class:`CaptureBoundary` is the same as a context manager; the snake_case names are aliases of the wiki's.
"""
from __future__ import annotations

import os

import networkx as nx
import torch.nn as nn

from .capture import Tracer, network_from_trace
from .errors import CaptureError
from .network import ReconstructedNetwork


class CaptureBoundary:
    """Records the forward of ``network`` run between :meth:`start` and :meth:`end` (or inside a ``with`` block)."""

    def __init__(self, network: nn.Module):
        if not isinstance(network, nn.Module):
            raise TypeError(f"a capture boundary needs an nn.Module, got {type(network).__name__}")
        self.network = network
        self._tracer = Tracer(network)
        self._ended = False

    def start(self) -> "CaptureBoundary":
        """Begin recording: the next forward of the network is captured."""
        self._tracer.start()
        return self

    def end(self) -> None:
        """Stop recording and remove everything the start installed on the network."""
        self._tracer.stop()
        self._ended = True

    def __enter__(self) -> "CaptureBoundary":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.end()

    def reconstructed_network(self, draw_path: str | os.PathLike | None = None) -> ReconstructedNetwork:
        """The recorded forward as a :class:`ReconstructedNetwork` (drawn to ``draw_path`` when given)."""
        if not self._ended:
            raise CaptureError("the capture boundary is still open; end it (insertCaptureBoundaryEnd) first")
        if self._tracer.example_inputs is None:
            raise CaptureError("no forward pass of the captured module ran between the capture boundaries")
        args, kwargs = self._tracer.example_inputs
        rnet = network_from_trace(self._tracer, self.network, args, kwargs, copy_modules=True)
        if draw_path is not None:
            rnet.draw(draw_path)
        return rnet


_open: CaptureBoundary | None = None
_closed: CaptureBoundary | None = None


def insertCaptureBoundaryStart(network: nn.Module) -> None:  # noqa: N802 - the AMC wiki's name
    """Start recording the next forward of ``network`` (one boundary may be open at a time)."""
    global _open
    if _open is not None:
        raise CaptureError("a capture boundary is already open; call insertCaptureBoundaryEnd() first")
    _open = CaptureBoundary(network).start()


def insertCaptureBoundaryEnd() -> None:  # noqa: N802 - the AMC wiki's name
    """Stop recording; the network is left exactly as it was before the start."""
    global _open, _closed
    if _open is None:
        raise CaptureError("no capture boundary is open; call insertCaptureBoundaryStart(network) first")
    boundary, _open = _open, None
    boundary.end()
    _closed = boundary


def getReconstructedNetwork(ifDraw: bool = False,  # noqa: N802,N803 - the AMC wiki's names
                            drawPath: str | os.PathLike | None = None) -> tuple[ReconstructedNetwork, nx.DiGraph]:
    """``(reconstructed_network, graph)`` of the last closed boundary: the network and its ``networkx.DiGraph``
    of nodes; with ``ifDraw`` the graph is drawn to ``drawPath`` (default ``reconstructed_network.svg``)."""
    if _closed is None:
        raise CaptureError("no capture has ended yet: insertCaptureBoundaryStart(network), run the forward, then "
                           "insertCaptureBoundaryEnd()")
    draw_path = (drawPath or "reconstructed_network") if ifDraw else None
    rnet = _closed.reconstructed_network(draw_path)
    return rnet, rnet.to_networkx()


insert_capture_boundary_start = insertCaptureBoundaryStart
insert_capture_boundary_end = insertCaptureBoundaryEnd


def get_reconstructed_network(draw: bool = False,
                              draw_path: str | os.PathLike | None = None) -> tuple[ReconstructedNetwork, nx.DiGraph]:
    """Snake-case spelling of :func:`getReconstructedNetwork`."""
    return getReconstructedNetwork(ifDraw=draw, drawPath=draw_path)
