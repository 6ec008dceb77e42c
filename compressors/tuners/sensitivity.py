"""One-shot sensitivity allocation (what NNI's sensitivity analysis and AIMET's greedy compression-ratio selection
do): compress each unit alone at a few preserve ratios, measure the held-out accuracy of each, then give every unit
the smallest ratio whose accuracy loss stays under one common threshold, the smallest threshold (by bisection)
whose policy fits the budget, scaled to fill the budget as the GA's and random search's policies are."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .search import SearchTuner


class SensitivityTuner(SearchTuner):
    """Sensitivity allocator; ``levels`` are the preserve ratios each unit is probed at alone (its episodes are
    ``len(units) * len(levels)`` probes plus the allocated policy, whatever ``episodes`` says). Other arguments as
    :class:`~compressors.tuners.search.SearchTuner`."""

    name = "sensitivity"

    def __init__(self, *args: Any, levels: Sequence[float] = (0.25, 0.5, 0.75), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.levels = sorted(float(level) for level in levels)
        self.episodes = len(self.units) * len(self.levels) + 1

    def signature(self) -> dict[str, Any]:
        return {**super().signature(), "levels": self.levels}

    def _probe_keeps(self, unit_index: int, level: float) -> list[int]:
        keeps = [unit.size for unit in self.units]
        keeps[unit_index] = self.units[unit_index].keep_for(max(level, self.units[unit_index].lowest /
                                                                self.units[unit_index].size))
        return keeps

    def _allocate(self, table: np.ndarray) -> list[int]:
        """The policy of the smallest accuracy-loss threshold that fits the budget (``table``: units x levels)."""
        ratios = np.array([1.0, *self.levels[::-1]])
        losses = np.maximum(self.original_accuracy - np.column_stack([np.full(len(table), self.original_accuracy),
                                                                      table[:, ::-1]]), 0)

        def policy(threshold: float) -> list[int]:
            chosen = []
            for unit, row in zip(self.units, losses):
                allowed = ratios[: int(np.argmax(row > threshold)) if (row > threshold).any() else len(ratios)]
                chosen.append(unit.keep_for(max(allowed.min(), unit.lowest / unit.size)))
            return chosen

        low, high = 0.0, 1.0
        for _ in range(30):
            middle = (low + high) / 2
            if self.model.cost(np.array(policy(middle))) <= self.wall.budget:
                high = middle
            else:
                low = middle
        return self.wall.rescale(np.array(policy(high)) / [unit.size for unit in self.units])

    def run_agent(self) -> None:
        probes = [(u, level) for u in range(len(self.units)) for level in self.levels]
        for episode in range(len(self.history), len(probes)):
            unit_index, level = probes[episode]
            keeps = self._probe_keeps(unit_index, level)
            outcome = self.scorer.score(episode, keeps, [level])
            outcome.reward = float("-inf")  # a probe is not a policy within the budget
            self.record(outcome)
        table = np.array([e.accuracy for e in self.history[:len(probes)]]).reshape(len(self.units), -1)
        self.record(self.scorer.score(len(probes), self._allocate(table)))

    def agent_state(self) -> dict[str, Any]:
        return {}

    def load_agent_state(self, state: dict[str, Any]) -> None:
        pass
