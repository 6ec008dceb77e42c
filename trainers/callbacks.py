"""The callback protocol of the trainers: hooks called at fixed points of the training loop.

Subclass :class:`Callback` and override what you need (every method is a no-op by default); pass instances as
``callbacks=`` to a trainer or to :func:`trainers.finetune.finetune`. ``on_batch_end`` runs right after
``optimizer.step()``, so a pruning mask re-applied there holds for every step.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping


class Callback:
    """A no-op hook set; override the methods you need. ``trainer`` is the running trainer (its ``network`` is the
    unwrapped model, its ``optimizer`` the optimizer, ``epoch`` and ``global_step`` where it is)."""

    def on_train_begin(self, trainer: Any) -> None:
        """Called once before the first epoch (after a resume has restored the trainer's state)."""

    def on_epoch_begin(self, trainer: Any, epoch: int) -> None:
        """Called before the first batch of epoch ``epoch`` (counted from 0)."""

    def on_batch_end(self, trainer: Any, step: int) -> None:
        """Called right after ``optimizer.step()``; ``step`` counts optimiser steps from 1 over the whole run."""

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: Mapping[str, float]) -> None:
        """Called after epoch ``epoch``'s validation and checkpoint, with its metrics (``train_*``, ``val_*``)."""


def call_all(callbacks: Iterable[Callback], event: str, *args: Any) -> None:
    """Call method ``event`` of every callback with ``args``, in order."""
    for callback in callbacks:
        getattr(callback, event)(*args)
