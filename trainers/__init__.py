"""Fine-tuning of (compressed) networks: :func:`finetune` in one call, :class:`BaseTrainer` with the AMC wiki's
hooks, tensorboardX logging and safe resume, :class:`ClassificationTrainer`, and :class:`BaseDistiller` for
distillation from the original.

Built-in offline datasets are in :mod:`trainers.datasets`.
"""
from __future__ import annotations

from .basedistiller import BaseDistiller
from .basetrainer import BaseTrainer
from .classification import ClassificationTrainer
from .finetune import finetune  # binds ``trainers.finetune`` to the function, not the submodule

__all__ = ["BaseTrainer", "BaseDistiller", "ClassificationTrainer", "finetune"]
