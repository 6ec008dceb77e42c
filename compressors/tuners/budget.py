"""AMC's action wall: clip each unit's action so that the budget can still be met, whatever the later units do.

At step ``t`` every earlier unit has its decided count and every later unit is assumed at its lowest allowed count;
the action is rounded to an allowed count and lowered, if needed, to the largest count whose total cost stays
within the budget. Because the lowest counts fit the budget at step 0 (checked up front), a fitting count exists at
every step and the finished policy always meets the budget.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from compressors.base import CompressionError

from .cost import CostModel

_SLACK = 1e-9


class ActionWall:
    """Keeps every policy within ``budget`` (a cost in the model's unit: MACs or seconds)."""

    def __init__(self, model: CostModel, budget: float):
        self.model, self.units, self.budget = model, model.units, float(budget)
        self.lowest = np.array([unit.lowest for unit in self.units], dtype=np.int64)
        floor = model.cost(self.lowest)
        if floor > self.budget * (1 + _SLACK):
            raise CompressionError(
                f"the budget of {self.budget:,.6g} {model.unit_name} ({self.budget / model.full:.1%} of the "
                f"original) cannot be met: even every unit at its lower bound costs {floor:,.6g} "
                f"({floor / model.full:.1%}); raise the target, lower lbound or round_to")

    def clip(self, decided: Sequence[int], ratio: float) -> int:
        """The kept count of unit ``len(decided)``: the allowed count nearest ``ratio * size``, lowered to the
        largest one that keeps the budget reachable with every later unit at its lowest count."""
        step = len(decided)
        unit = self.units[step]
        candidates = np.tile(self.lowest, (len(unit.keeps), 1))
        candidates[:, :step] = np.asarray(decided, dtype=np.int64)
        candidates[:, step] = unit.keeps
        fits = unit.keeps[self.model.cost(candidates) <= self.budget * (1 + _SLACK)]
        wanted = unit.keep_for(float(np.clip(ratio, 0.0, 1.0)))
        below = fits[fits <= wanted]
        return int(below.max() if below.size else fits.min())

    def repair(self, ratios: Sequence[float]) -> list[int]:
        """Kept counts of a whole policy, unit by unit through :meth:`clip` (the GA's constraint handling)."""
        keeps: list[int] = []
        for ratio in ratios:
            keeps.append(self.clip(keeps, ratio))
        return keeps

    def rescale(self, ratios: Sequence[float], steps: int = 30) -> list[int]:
        """Kept counts of a whole policy with its shape kept: every preserve ratio multiplied by one factor, the
        largest (found by bisection, each ratio capped at 1) whose rounded counts fit the budget, then made exact by
        :meth:`repair`. A policy far under the budget is scaled up, one over it down (the GA's repair)."""
        sizes = np.array([unit.size for unit in self.units], dtype=np.float64)
        ratios = np.clip(np.asarray(ratios, dtype=np.float64), self.lowest / sizes, 1.0)

        def keeps_at(factor: float) -> list[int]:
            return [unit.keep_for(r) for unit, r in zip(self.units, np.clip(ratios * factor, self.lowest / sizes, 1))]

        low, high = 0.0, 1.0 / ratios.min()
        for _ in range(steps):
            middle = (low + high) / 2
            if self.model.cost(np.array(keeps_at(middle))) <= self.budget * (1 + _SLACK):
                low = middle
            else:
                high = middle
        return self.repair(np.array(keeps_at(low)) / sizes)

