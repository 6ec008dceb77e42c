"""Random search: the baseline a learned search must beat at an equal number of evaluations. Each episode draws
every unit's preserve ratio uniformly from ``[lbound, 1]`` and repairs the policy to the budget as the GA does
(scaled to fill it, then through the action wall)."""
from __future__ import annotations

from typing import Any

from .search import SearchTuner


class RandomSearchTuner(SearchTuner):
    """Uniformly random policies, repaired to the budget; arguments as
    :class:`~compressors.tuners.search.SearchTuner`."""

    name = "random"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.rng = self.generator()

    def run_agent(self) -> None:
        for episode in range(len(self.history), self.episodes):
            ratios = self.rng.uniform(self.lbound, 1.0, len(self.units))
            self.record(self.scorer.score(episode, self.wall.rescale(ratios), ratios.tolist()))

    def agent_state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_agent_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
