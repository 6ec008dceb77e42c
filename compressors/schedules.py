"""Gradual sparsity schedules, applied during fine-tuning by the :class:`GradualPruning` trainer callback.

A schedule maps a time (an epoch for Paddle's pass-based schedule, an optimiser step for Zhu & Gupta's) and a
layer's final sparsity to the sparsity that layer must have by then:

- :class:`PaddleLogSchedule` (PaddlePaddle's ``dynamic_pruning`` hook): every ``interval_pass`` passes up to
  ``end_pass``, ``s = upper_bound * log(2 + p / interval_pass) / log(2 + end_pass / interval_pass)``, so sparsity
  rises fast at first and slowly at the end, reaching ``upper_bound`` at ``end_pass``;
- :class:`CubicSchedule` (Zhu & Gupta, "To prune, or not to prune", 2017): every ``frequency`` steps from
  ``begin_step`` to ``end_step``, ``s = s_f + (s_i - s_f) * (1 - (t - begin_step) / (end_step - begin_step)) ** 3``.

Between updates the sparsity stays where the last update put it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Protocol

from trainers.callbacks import Callback


class SparsitySchedule(Protocol):
    """When and how far to prune: ``unit`` is ``"epoch"`` or ``"step"``."""

    unit: str

    def sparsity_at(self, time: int, final: float) -> float:
        """The sparsity a layer whose final sparsity is ``final`` has at ``time``."""


class PaddleLogSchedule:
    """PaddlePaddle's dynamic pruning: a log curve updated every ``interval_pass`` epochs until ``end_pass``."""

    unit = "epoch"

    def __init__(self, interval_pass: int = 3, end_pass: int = 60):
        if interval_pass < 1 or end_pass < 0:
            raise ValueError(f"need interval_pass >= 1 and end_pass >= 0, got {interval_pass} and {end_pass}")
        self.interval_pass, self.end_pass = interval_pass, end_pass

    def sparsity_at(self, time: int, final: float) -> float:
        """``final * log(2 + p / interval) / log(2 + end / interval)`` at the last update pass ``p <= time``."""
        last_update = min(time, self.end_pass) // self.interval_pass * self.interval_pass
        weight = final / math.log(self.end_pass / self.interval_pass + 2)
        return min(final, weight * math.log(2 + last_update / self.interval_pass))


class CubicSchedule:
    """Zhu & Gupta's cubic schedule from ``initial_sparsity`` at ``begin_step`` to the final one at ``end_step``,
    updated every ``frequency`` optimiser steps."""

    unit = "step"

    def __init__(self, begin_step: int = 0, end_step: int = 1000, frequency: int = 100,
                 initial_sparsity: float = 0.0):
        if not 0 <= begin_step < end_step or frequency < 1 or not 0 <= initial_sparsity < 1:
            raise ValueError("need 0 <= begin_step < end_step, frequency >= 1 and 0 <= initial_sparsity < 1")
        self.begin_step, self.end_step = begin_step, end_step
        self.frequency, self.initial_sparsity = frequency, initial_sparsity

    def sparsity_at(self, time: int, final: float) -> float:
        """``s_f + (s_i - s_f)(1 - progress)^3`` at the last update step, 0 before ``begin_step``."""
        if time < self.begin_step:
            return 0.0
        last_update = self.begin_step + (min(time, self.end_step) - self.begin_step) // self.frequency * self.frequency
        progress = (last_update - self.begin_step) / (self.end_step - self.begin_step)
        initial = min(self.initial_sparsity, final)
        return final + (initial - final) * (1 - progress) ** 3


SCHEDULES = {"paddle-log": PaddleLogSchedule, "cubic": CubicSchedule}


class GradualPruning(Callback):
    """A trainer callback that raises ``network``'s sparsity along ``schedule`` while it fine-tunes.

    ``pruner`` is a :class:`~compressors.magnitude.MagnitudePruning` (its method and scope choose the weights); the
    final sparsity per node is the pruner's. Masks are recomputed from the current weights at every scheduled
    update and stay applied in between (``torch.nn.utils.prune``'s re-parametrisation). ``history`` holds
    ``(time, mean sparsity asked)`` for every update.
    """

    def __init__(self, pruner: Any, network: Any, schedule: SparsitySchedule):
        self.pruner, self.network, self.schedule = pruner, network, schedule
        self.finals: Mapping[str, float] = pruner.targets
        self.current: dict[str, float] = {}
        self.history: list[tuple[int, float]] = []

    def update(self, time: int) -> None:
        """Apply the schedule's sparsities for ``time`` when they changed."""
        wanted = {name: self.schedule.sparsity_at(time, final) for name, final in self.finals.items()}
        if wanted != self.current:
            self.pruner.apply_masks(self.network, wanted)
            self.current = wanted
            self.history.append((time, sum(wanted.values()) / max(len(wanted), 1)))

    def on_train_begin(self, trainer: Any) -> None:
        if self.schedule.unit == "step":
            self.update(0)

    def on_epoch_begin(self, trainer: Any, epoch: int) -> None:
        if self.schedule.unit == "epoch":
            self.update(epoch)

    def on_batch_end(self, trainer: Any, step: int) -> None:
        if self.schedule.unit == "step":
            self.update(step)
