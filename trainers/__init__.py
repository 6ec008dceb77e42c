"""Fine-tuning of (compressed) networks: :class:`BaseTrainer` with the AMC wiki's hooks, tensorboardX logging and
safe resume, :class:`ClassificationTrainer`, and :class:`BaseDistiller` for distillation from the original.

Built-in offline datasets are in :mod:`trainers.datasets`.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"BaseTrainer": "basetrainer", "BaseDistiller": "basedistiller", "ClassificationTrainer": "classification",
            "finetune": "finetune"}


def __getattr__(name: str) -> Any:
    """Import a trainer's module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainers' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = list(_EXPORTS)
