"""Episode rewards, by name: AMC's resource-constrained reward (held-out accuracy, the budget being enforced by the
action wall) and its accuracy-guaranteed reward ``-error * log(MACs)``."""
from __future__ import annotations

import math
from typing import Callable

Reward = Callable[[float, float], float]
"""``reward(accuracy, cost)``: accuracy in [0, 1] on the held-out images, cost in MACs (or seconds)."""

REWARDS: dict[str, Reward] = {
    "accuracy": lambda accuracy, cost: accuracy,
    "error-log-macs": lambda accuracy, cost: -(1.0 - accuracy) * math.log(max(cost, 1.0)),
}


def reward_function(name: str) -> Reward:
    """The reward called ``name`` (one of ``REWARDS``); ``ValueError`` naming the choices otherwise."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    return REWARDS[name]
