"""``finetune``: the one-call recovery step every compressor ends with: SGD with momentum and a per-step cosine
learning rate, optionally distilling from the original network (the teacher), on top of
:class:`~trainers.classification.ClassificationTrainer` / :class:`~trainers.basedistiller.BaseDistiller`."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from trainers.basedistiller import BaseDistiller, Hints
from trainers.callbacks import Callback
from trainers.classification import ClassificationTrainer


def finetune(network: nn.Module, train_loader: DataLoader, val_loader: DataLoader | None = None, *,
             epochs: int = 1, max_steps: int | None = None, lr: float = 0.01, momentum: float = 0.9,
             weight_decay: float = 5e-4, teacher: nn.Module | None = None, temperature: float = 4.0,
             alpha: float = 0.9, device: torch.device | str | None = None, verbose: bool = False,
             callbacks: Sequence[Callback] = (), hints: Hints = (), hint_weight: float = 0.1,
             precision: str = "fp32",
             checkpoints_folder: str | os.PathLike | None = None, resume: bool = False,
             tbx_writer: Any = None) -> dict[str, Any]:
    """Fine-tune the classifier ``network`` in place on ``(inputs, labels)`` batches and return the metrics.

    Runs ``epochs`` epochs (at most ``max_steps`` optimiser steps) of SGD (``lr``, ``momentum``, ``weight_decay``)
    with the rate annealed to zero by a per-step cosine. With ``teacher`` (the original network) the loss is
    ``alpha`` times the temperature-``temperature`` logit distillation loss plus ``1 - alpha`` times cross-entropy,
    plus ``hint_weight`` times the MSE of feature ``hints`` (node names shared by both networks). ``device`` is where to train (``None``: where the
    network is; ``"auto"``: the accelerator when there is one); ``precision`` is ``"fp32"``, ``"bf16"`` or
    ``"fp16"``. ``callbacks`` see every step (:class:`~trainers.callbacks.Callback`; re-apply a pruning mask in
    ``on_batch_end``). ``checkpoints_folder``
    and ``resume`` keep and continue from checkpoints, ``tbx_writer`` (a ``SummaryWriter`` or a log directory)
    receives tensorboardX logs, as in :class:`~trainers.basetrainer.BaseTrainer`.

    Returns the last epoch's metrics (``train_total_loss``, ``train_top1``, ``val_top1``, ``val_top5``,
    ``val_total_loss`` when ``val_loader`` is given, ...) plus ``steps`` (optimiser steps taken in all),
    ``epochs_run`` and ``history``.
    """
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    options: dict[str, Any] = dict(train_loader=train_loader, val_loader=val_loader, eval_loader=None,
                                   network=network, criterion=nn.CrossEntropyLoss(), optimizer=optimizer,
                                   scheduler=None, epochs=epochs, device=device, tbx_writer=tbx_writer,
                                   checkpoints_folder=checkpoints_folder, additional_args=None,
                                   callbacks=callbacks, precision=precision, max_steps=max_steps,
                                   scheduler_interval="step", verbose=verbose)
    if teacher is not None:
        trainer: ClassificationTrainer = BaseDistiller(**options, teacher=teacher, temperature=temperature,
                                                       alpha=alpha, hints=hints, hint_weight=hint_weight)
    elif hints:
        raise ValueError("feature hints need a teacher")
    else:
        trainer = ClassificationTrainer(**options)
    trainer.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=trainer.total_steps)
    summary = trainer.run(resume=resume)
    summary["steps"] = summary["global_step"]
    return summary
