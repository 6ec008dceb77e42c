"""``ClassificationTrainer``: :class:`~trainers.basetrainer.BaseTrainer` for ``(images, labels)`` classification,
with cross-entropy by default and top-1/top-5 accuracy logged for training and validation; the best checkpoint is
the one with the highest validation top-1. The AMC wiki's CIFAR-10 trainer is this class."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from trainers.basetrainer import BaseTrainer


def topk_accuracies(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Fraction of rows of ``logits`` whose label is among the ``k`` largest, as ``{"top1": ..., "top5": ...}``
    (a ``k`` above the number of classes is left out). Dense outputs ``(N, C, *positions)`` with ``(N,
    *positions)`` labels (segmentation) count every position as a row."""
    if logits.dim() > 2 and labels.shape == logits.shape[:1] + logits.shape[2:]:
        logits, labels = logits.movedim(1, -1).reshape(-1, logits.shape[1]), labels.reshape(-1)
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected (N, classes) logits and (N,) labels, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    ks = tuple(k for k in ks if k <= logits.shape[1])
    ranked = logits.topk(max(ks), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


class ClassificationTrainer(BaseTrainer):
    """Trains a classifier on ``(inputs, labels)`` batches: ``criterion`` defaults to ``nn.CrossEntropyLoss()``,
    top-1 and top-5 accuracy are logged as ``train_top1``, ``val_top1``, ... and ``val_top1`` picks ``best.pt``.
    Takes :class:`BaseTrainer`'s arguments."""

    monitor = "val_top1"
    monitor_mode = "max"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self._criterion is None:
            self._criterion = nn.CrossEntropyLoss()

    def train_batch_metrics(self, preds: Any, batch: Any) -> dict[str, float]:
        """Top-1/top-5 accuracy of the training batch (measured in train mode, as the loss)."""
        return topk_accuracies(preds.float(), batch[1])

    def val_batch_metrics(self, preds: Any, batch: Any) -> dict[str, float]:
        """Top-1/top-5 accuracy of the validation batch."""
        return topk_accuracies(preds.float(), batch[1])
