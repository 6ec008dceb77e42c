"""AMC's environment: one step per unit in topological order; the agent's action is the unit's preserve ratio,
the action wall turns it into an allowed kept count within the budget, and the episode's policy is scored once at
the end."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .budget import ActionWall
from .rewards import Reward
from .state import StateEncoder


@dataclass
class Episode:
    """One evaluated policy: kept count and preserve ratio per unit, its cost (and fraction of the original),
    held-out accuracy, reward, the raw actions that led to it and the seconds it took."""

    index: int
    keeps: list[int]
    ratios: list[float]
    cost: float
    cost_ratio: float
    accuracy: float
    reward: float
    actions: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class PolicyScorer:
    """Scores a whole policy (kept counts): held-out accuracy from ``accuracy``, cost from the wall's model,
    reward from ``reward``; identical policies are scored once (``evaluations`` counts the distinct ones)."""

    def __init__(self, wall: ActionWall, accuracy: Callable[[Sequence[int]], float], reward: Reward):
        self.wall, self.accuracy, self.reward = wall, accuracy, reward
        self.cache: dict[tuple[int, ...], float] = {}

    @property
    def evaluations(self) -> int:
        """How many distinct policies were evaluated."""
        return len(self.cache)

    def score(self, index: int, keeps: Sequence[int], actions: Sequence[float] = ()) -> Episode:
        """The :class:`Episode` of ``keeps``."""
        started = time.perf_counter()
        key = tuple(int(k) for k in keeps)
        if key not in self.cache:
            self.cache[key] = float(self.accuracy(key))
        accuracy = self.cache[key]
        model = self.wall.model
        cost = model.cost(np.array(key))
        sizes = [unit.size for unit in self.wall.units]
        return Episode(index, list(key), [k / s for k, s in zip(key, sizes)], cost, cost / model.full, accuracy,
                       float(self.reward(accuracy, cost)), [float(a) for a in actions],
                       time.perf_counter() - started)


class CompressionEnv:
    """The DDPG environment. :meth:`reset` starts an episode and returns the first state; :meth:`step` takes a
    preserve ratio and returns ``(next state, done)``; :meth:`finish` scores the finished policy."""

    def __init__(self, wall: ActionWall, encoder: StateEncoder, scorer: PolicyScorer):
        self.wall, self.encoder, self.scorer = wall, encoder, scorer
        self.keeps: list[int] = []
        self.actions: list[float] = []

    @property
    def steps(self) -> int:
        """Steps per episode (the number of units)."""
        return len(self.wall.units)

    def reset(self) -> np.ndarray:
        """Start an episode: nothing decided, previous action 1 (AMC's start)."""
        self.keeps, self.actions = [], []
        return self.encoder.state(self.keeps, 1.0)

    def step(self, action: float) -> tuple[np.ndarray, bool]:
        """Decide the current unit from the preserve ratio ``action`` (clipped by the wall)."""
        unit = self.wall.units[len(self.keeps)]
        self.actions.append(float(action))
        self.keeps.append(self.wall.clip(self.keeps, action))
        done = len(self.keeps) == self.steps
        previous = self.keeps[-1] / unit.size
        state = self.encoder.state(self.keeps[:-1], previous) if done else self.encoder.state(self.keeps, previous)
        return state, done

    def finish(self, index: int) -> Episode:
        """Score the episode's policy."""
        return self.scorer.score(index, self.keeps, self.actions)
