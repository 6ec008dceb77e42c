"""AMC's per-step state: ten features of the unit being decided, each normalised to [0, 1].

Static features (index, layer type, in channels, out channels, stride, kernel, the unit's MACs) are min-max
normalised over the network's units, as AMC does; the dynamic ones are fractions of the original cost: reduced so
far (by the decided units), remaining (of the nodes that depend on later units), and the previous action.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .cost import CostModel
from .units import LAYER_TYPES

FEATURES = ("index", "type", "in_channels", "out_channels", "stride", "kernel", "cost", "reduced", "remaining",
            "previous_action")


def minmax(columns: np.ndarray) -> np.ndarray:
    """Each column scaled to [0, 1] by its min and max (a constant column becomes 0)."""
    low, high = columns.min(axis=0), columns.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    return (columns - low) / span


class StateEncoder:
    """Builds the state vector of step ``t`` from the units' static features and the decisions so far."""

    def __init__(self, model: CostModel):
        self.model = model
        units = model.units
        static = np.array([[index, LAYER_TYPES.index(unit.layer["type"]), unit.layer["in_channels"],
                            unit.layer["out_channels"], unit.layer["stride"], unit.layer["kernel"],
                            model.unit_cost(index)] for index, unit in enumerate(units)], dtype=np.float64)
        self.static = minmax(static)
        self.remaining = np.array([model.cost_after(index) for index in range(len(units))]) / model.full

    @property
    def dim(self) -> int:
        """Length of a state vector."""
        return len(FEATURES)

    def state(self, decided: Sequence[int], previous_action: float) -> np.ndarray:
        """The state of unit ``len(decided)``: its static features, the cost fraction the decided units removed
        (later units at full size), the fraction of later units' cost, and the previous action."""
        step = len(decided)
        keeps = self.model.sizes.copy()
        keeps[:step] = np.asarray(decided, dtype=np.int64)
        reduced = (self.model.full - self.model.cost(keeps)) / self.model.full
        dynamic = [float(np.clip(reduced, 0, 1)), float(self.remaining[step]), float(previous_action)]
        return np.concatenate([self.static[step], dynamic]).astype(np.float32)
