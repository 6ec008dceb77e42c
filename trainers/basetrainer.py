"""``BaseTrainer``: the AMC wiki's fixed training loop with overridable steps, tensorboardX logging, atomic
checkpoints with resume, mixed precision and ``torchrun`` data parallelism.

The loop is fixed; a subclass overrides the steps it needs:

- ``train_batch_preds(batch, **kwargs)`` / ``val_batch_preds``: the network's predictions for one loader batch;
- ``train_losses(preds, batch, **kwargs)`` / ``val_losses``: a dict of losses with ``"total_loss"`` (the one
  back-propagated); every entry is averaged per epoch and logged;
- ``train_batch_metrics(preds, batch)`` / ``val_batch_metrics``: extra per-batch means (accuracy, ...);
- ``should_stop(**kwargs)``: checked after every epoch.

The wiki's names work too, as aliases both ways: ``__get_train_batch_preds__``, ``__get_train_losses__``,
``__get_val_batch_preds__``, ``__get_val_losses__``, ``__if_stop_trainning__`` and ``__run__`` (a subclass may
override either name). Keyword arguments of ``run``/``__run__`` reach every step (``trainer.__run__(stop_lr=1e-6)``
and ``kwargs["stop_lr"]`` in ``__if_stop_trainning__``), except ``resume``: ``run(resume=True)`` continues from
``checkpoints_folder/latest.pt``.

Inside the steps ``self._network`` is the network to call (wrapped in ``DistributedDataParallel`` while training
under torchrun), ``self._device``, ``self._criterion``, ``self._optimizer`` and ``self._additional_args`` are the
constructor's arguments, as in the wiki; :attr:`network` is always the plain network.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from compressors.base import batch_inputs, run_network, to_device
from trainers.callbacks import Callback, call_all
from trainers.checkpoint import (BEST_NAME, LATEST_NAME, CheckpointError, load_checkpoint, load_model_state,
                                 restore_rng_states, rng_states, save_checkpoint)
from trainers.devices import autocast, check_precision, grad_scaler, resolve_device
from trainers.distributed import DistributedContext

WIKI_ALIASES: dict[str, str] = {
    "train_batch_preds": "__get_train_batch_preds__",
    "train_losses": "__get_train_losses__",
    "val_batch_preds": "__get_val_batch_preds__",
    "val_losses": "__get_val_losses__",
    "should_stop": "__if_stop_trainning__",
    "run": "__run__",
}
SCHEDULER_INTERVALS = ("epoch", "step")
MONITOR_MODES = ("min", "max")


def _alias_of(function: Callable) -> Callable:
    """A method calling ``function``, marked so that the wiki-name dispatch skips it."""
    def alias(self, *args: Any, **kwargs: Any) -> Any:
        return function(self, *args, **kwargs)

    alias.__doc__, alias.__name__, alias.wiki_alias = function.__doc__, function.__name__, True
    return alias


def _wiki_name(idiomatic: str) -> Callable:
    """The base class's wiki-named method: runs the nearest real (non-alias) ``idiomatic`` method."""
    def wiki_method(self, *args: Any, **kwargs: Any) -> Any:
        for klass in type(self).__mro__:
            method = klass.__dict__.get(idiomatic)
            if method is not None and not getattr(method, "wiki_alias", False):
                return method(self, *args, **kwargs)
        raise AttributeError(idiomatic)

    wiki_method.__name__ = WIKI_ALIASES[idiomatic]
    wiki_method.__doc__ = f"The AMC wiki's name of :meth:`{idiomatic}`."
    return wiki_method


def batch_size(batch: Any) -> int:
    """The number of examples in a loader batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        size = batch_size(item)
        if size:
            return size
    return 0


class BaseTrainer:
    """The fixed training loop of the AMC wiki (see the module docstring for the steps to override).

    ``train_loader`` yields training batches (``(inputs, targets)`` by default); ``val_loader`` is evaluated after
    every epoch and ``eval_loader`` once at the end (either may be ``None``). ``network`` is trained in place (moved
    to ``device``; ``None`` keeps it where it is, ``"auto"`` picks the accelerator when there is one). ``scheduler`` is any
    ``torch.optim.lr_scheduler`` (``ReduceLROnPlateau`` is stepped with the monitored metric), stepped per epoch
    or, with ``scheduler_interval="step"``, per optimiser step. ``tbx_writer`` is a tensorboardX ``SummaryWriter``,
    a log directory, or ``None``. ``checkpoints_folder`` receives ``latest.pt`` after every epoch and ``best.pt``
    when ``monitor`` improves. ``additional_args`` is kept for the steps (the wiki's ``args``).

    Keyword-only: ``callbacks`` (:class:`~trainers.callbacks.Callback` instances), ``precision``
    (``"fp32"``, ``"bf16"``, ``"fp16"``), ``max_steps`` (stop after that many optimiser steps in all),
    ``monitor``/``monitor_mode`` (the metric that picks ``best.pt``, such as ``"val_total_loss"``/``"min"``),
    ``grad_clip_norm``, ``verbose`` (tqdm bars and a line per epoch on rank 0).
    """

    monitor: str = "val_total_loss"
    monitor_mode: str = "min"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for idiomatic, wiki in WIKI_ALIASES.items():
            if wiki in cls.__dict__ and idiomatic in cls.__dict__:
                raise TypeError(f"{cls.__name__} defines both {idiomatic} and its wiki alias {wiki}; define one")
            if wiki in cls.__dict__:
                setattr(cls, idiomatic, _alias_of(cls.__dict__[wiki]))

    def __init__(self, train_loader: DataLoader, val_loader: DataLoader | None = None,
                 eval_loader: DataLoader | None = None, network: nn.Module | None = None,
                 criterion: Callable | None = None, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: Any = None, epochs: int = 1, device: torch.device | str | None = None,
                 tbx_writer: Any = None, checkpoints_folder: str | os.PathLike | None = None,
                 additional_args: Any = None, *, callbacks: Sequence[Callback] = (), precision: str = "fp32",
                 max_steps: int | None = None, scheduler_interval: str = "epoch", monitor: str | None = None,
                 monitor_mode: str | None = None, grad_clip_norm: float | None = None, verbose: bool = True):
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be an nn.Module, got {type(network).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if train_loader is None:
            raise ValueError("train_loader is required")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                      or max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise ValueError(f"scheduler_interval must be one of {SCHEDULER_INTERVALS}, got {scheduler_interval!r}")
        self.monitor_mode = monitor_mode or self.monitor_mode
        if self.monitor_mode not in MONITOR_MODES:
            raise ValueError(f"monitor_mode must be one of {MONITOR_MODES}, got {self.monitor_mode!r}")
        self.monitor = monitor or (self.monitor if val_loader is not None
                                   else self.monitor.replace("val_", "train_", 1))
        self._device = resolve_device(device, network)
        self.network = network.to(self._device)
        self.distributed = DistributedContext.from_environment(self._device)
        self._training_network = self.distributed.wrap(self.network, self._device)
        self._network = self._training_network
        self._train_loader = self.distributed.shard(train_loader, train=True)
        self._val_loader = self.distributed.shard(val_loader, train=False)
        self._eval_loader = self.distributed.shard(eval_loader, train=False)
        self._criterion, self._optimizer, self._scheduler = criterion, optimizer, scheduler
        self._epochs, self._additional_args = epochs, additional_args
        self._checkpoints_folder = os.fspath(checkpoints_folder) if checkpoints_folder is not None else None
        self._tbx_writer = self._writer(tbx_writer) if self.distributed.is_main else None
        self.callbacks = list(callbacks)
        self.precision = check_precision(precision)
        self.scaler = grad_scaler(self._device, self.precision)
        self.max_steps, self.scheduler_interval, self.grad_clip_norm = max_steps, scheduler_interval, grad_clip_norm
        self.verbose = verbose
        self.epoch = 0
        self.global_step = 0
        self.best_metric: float | None = None
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ the steps a subclass overrides
    def train_batch_preds(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        """The network's predictions for one training batch (default: the network on the batch's inputs)."""
        return run_network(self._network, batch_inputs(batch))

    def train_losses(self, preds: Any, batch: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The losses of one training batch, with ``"total_loss"`` (default: ``criterion(preds, batch[1])``)."""
        return {"total_loss": self._criterion_loss(preds, batch)}

    def val_batch_preds(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        """The network's predictions for one validation batch (run in eval mode without grad)."""
        return run_network(self._network, batch_inputs(batch))

    def val_losses(self, preds: Any, batch: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The losses of one validation batch, with ``"total_loss"`` (default: ``criterion(preds, batch[1])``)."""
        return {"total_loss": self._criterion_loss(preds, batch)}

    def train_batch_metrics(self, preds: Any, batch: Any) -> dict[str, float]:
        """Extra means over one training batch to log beside the losses (none by default)."""
        return {}

    def val_batch_metrics(self, preds: Any, batch: Any) -> dict[str, float]:
        """Extra means over one validation batch to log beside the losses (none by default)."""
        return {}

    def should_stop(self, *args: Any, **kwargs: Any) -> bool:
        """Whether to stop after this epoch; by default when ``run(stop_lr=...)`` was given and every learning rate
        fell below it. ``self.history[-1]`` holds the epoch's metrics."""
        stop_lr = kwargs.get("stop_lr")
        return stop_lr is not None and all(group["lr"] < stop_lr for group in self._optimizer.param_groups)

    __get_train_batch_preds__ = _wiki_name("train_batch_preds")
    __get_train_losses__ = _wiki_name("train_losses")
    __get_val_batch_preds__ = _wiki_name("val_batch_preds")
    __get_val_losses__ = _wiki_name("val_losses")
    __if_stop_trainning__ = _wiki_name("should_stop")
    __run__ = _wiki_name("run")

    # ------------------------------------------------------------------ extension points of subclasses
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimisers stepped together every step (a distiller adds its hint adapters' one)."""
        return [self._optimizer]

    def before_optimizer_step(self) -> None:
        """Runs between ``backward`` and the optimiser step: clips the gradient norm when ``grad_clip_norm`` is
        set. Subclasses that train parameters outside the network synchronise them here."""
        if self.grad_clip_norm is not None:
            for optimizer in self.optimizers():
                self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(parameters_of(self.optimizers()), self.grad_clip_norm)

    def extra_state(self) -> dict[str, Any]:
        """State beyond the network and optimiser that a checkpoint must keep (none by default)."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    # ------------------------------------------------------------------ the loop
    def run(self, *args: Any, resume: bool | str | os.PathLike = False, **kwargs: Any) -> dict[str, Any]:
        """Train for the remaining epochs and return a summary: the last epoch's metrics, ``eval_*`` metrics of
        ``eval_loader``, ``best_metric``, ``global_step``, ``epochs_run`` and ``history`` (one dict per epoch).

        ``resume=True`` continues from ``checkpoints_folder/latest.pt`` (from scratch when there is none yet, so
        one command line survives restarts); ``resume=PATH`` from that checkpoint. Other keyword arguments reach
        every step as ``**kwargs``.
        """
        if resume:
            self._resume(resume)
        if self._checkpoints_folder and self.distributed.is_main:
            os.makedirs(self._checkpoints_folder, exist_ok=True)
        call_all(self.callbacks, "on_train_begin", self)
        epochs_run = 0
        while self.epoch < self._epochs and not self._steps_exhausted():
            metrics = self._run_epoch(self.epoch, kwargs)
            epochs_run += 1
            self.epoch += 1
            self._save_checkpoints(metrics)
            call_all(self.callbacks, "on_epoch_end", self, self.epoch - 1, metrics)
            if self.should_stop(*args, **kwargs):
                break
        summary: dict[str, Any] = dict(self.history[-1]) if self.history else {}
        if self._eval_loader is not None:
            evaluation = self.evaluate(self._eval_loader, "eval", **kwargs)
            self._log(evaluation, self.epoch)
            summary.update(evaluation)
        if self._tbx_writer is not None:
            self._tbx_writer.flush()
        summary.update(best_metric=self.best_metric, monitor=self.monitor, global_step=self.global_step,
                       epochs_run=epochs_run, history=list(self.history))
        return summary

    def evaluate(self, loader: DataLoader, prefix: str = "val", **kwargs: Any) -> dict[str, float]:
        """Mean losses and metrics of the validation steps over ``loader`` (eval mode, no grad, summed over
        processes), keyed ``"{prefix}_{name}"``."""
        sums: dict[str, float] = defaultdict(float)
        count = 0
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.no_grad(), self._plain_network():
                for batch in loader:
                    batch = to_device(batch, self._device)
                    with autocast(self._device, self.precision):
                        preds = self.val_batch_preds(batch, **kwargs)
                        losses = self.val_losses(preds, batch, **kwargs)
                    size = batch_size(batch)
                    self._accumulate(sums, losses, self.val_batch_metrics(preds, batch), size)
                    count += size
        finally:
            self.network.train(was_training)
        return self._means(sums, count, prefix)

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore the network, optimiser, scheduler, scaler, epoch, best metric, history and RNG states from a
        checkpoint; :class:`~trainers.checkpoint.CheckpointError` when its tensors do not fit this network."""
        state = load_checkpoint(path, map_location=self._device)
        load_model_state(self.network, state["model"], source=f"checkpoint {os.fspath(path)}")
        self._optimizer.load_state_dict(state["optimizer"])
        if self._scheduler is not None and state.get("scheduler") is not None:
            self._scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best_metric, self.history = state["best_metric"], list(state["history"])
        restore_rng_states(state["rng"], self._loader_generators())
        self.load_extra_state(state["extra"])
        return state

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resumed run needs, as saved in ``latest.pt`` and ``best.pt``."""
        return {"epoch": self.epoch, "global_step": self.global_step, "model": self.network.state_dict(),
                "optimizer": self._optimizer.state_dict(),
                "scheduler": self._scheduler.state_dict() if self._scheduler is not None else None,
                "scaler": self.scaler.state_dict(), "best_metric": self.best_metric, "monitor": self.monitor,
                "history": list(self.history), "rng": rng_states(self._loader_generators()),
                "extra": self.extra_state()}

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimiser of the network."""
        return self._optimizer

    @property
    def scheduler(self) -> Any:
        """The learning-rate scheduler (``None`` for a constant rate); settable, e.g. once :attr:`total_steps` is
        known."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler: Any) -> None:
        self._scheduler = scheduler

    @property
    def total_steps(self) -> int:
        """How many optimiser steps a full run takes: ``epochs`` times this process's batches per epoch, capped by
        ``max_steps``."""
        steps = self._epochs * len(self._train_loader)
        return min(steps, self.max_steps) if self.max_steps is not None else steps

    @property
    def device(self) -> torch.device:
        """The device the network trains on."""
        return self._device

    # ------------------------------------------------------------------ internals
    def _run_epoch(self, epoch: int, kwargs: dict[str, Any]) -> dict[str, float]:
        call_all(self.callbacks, "on_epoch_begin", self, epoch)
        sampler = getattr(self._train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        lr = self._optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        train = self._train_epoch(epoch, kwargs)
        metrics: dict[str, float] = {"epoch": float(epoch), "lr": lr, **train}
        metrics["epoch_time"] = time.perf_counter() - start
        if self._val_loader is not None:
            metrics.update(self.evaluate(self._val_loader, "val", **kwargs))
        if self.monitor not in metrics:
            raise KeyError(f"monitor {self.monitor!r} is not among the epoch's metrics ({', '.join(metrics)})")
        self._step_scheduler_after_epoch(metrics[self.monitor])
        self.history.append(metrics)
        self._log(metrics, epoch)
        if self.verbose and self.distributed.is_main:
            tqdm.write(f"epoch {epoch + 1}/{self._epochs}: " + ", ".join(
                f"{key} {value:.4g}" for key, value in metrics.items() if key != "epoch"))
        return metrics

    def _train_epoch(self, epoch: int, kwargs: dict[str, Any]) -> dict[str, float]:
        self.network.train()
        sums: dict[str, float] = defaultdict(float)
        count = 0
        bar = tqdm(self._train_loader, desc=f"epoch {epoch + 1}/{self._epochs}", leave=False,
                   disable=not (self.verbose and self.distributed.is_main))
        for batch in bar:
            batch = to_device(batch, self._device)
            with autocast(self._device, self.precision):
                preds = self.train_batch_preds(batch, **kwargs)
                losses = self.train_losses(preds, batch, **kwargs)
            total = self._total_loss(losses)
            for optimizer in self.optimizers():
                optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.before_optimizer_step()
            for optimizer in self.optimizers():
                self.scaler.step(optimizer)
            self.scaler.update()
            self.global_step += 1
            if self._scheduler is not None and self.scheduler_interval == "step":
                self._scheduler.step()
            call_all(self.callbacks, "on_batch_end", self, self.global_step)
            size = batch_size(batch)
            values = {name: float(value.detach() if isinstance(value, torch.Tensor) else value)
                      for name, value in losses.items()}
            with torch.no_grad():
                self._accumulate(sums, values, self.train_batch_metrics(preds, batch), size)
            count += size
            bar.set_postfix(loss=f"{values['total_loss']:.4f}")
            if self._tbx_writer is not None:
                for name, value in values.items():
                    self._tbx_writer.add_scalar(f"train_step/{name}", value, self.global_step)
            if self._steps_exhausted():
                break
        bar.close()
        return self._means(sums, count, "train")

    def _total_loss(self, losses: Any) -> torch.Tensor:
        if not isinstance(losses, Mapping) or "total_loss" not in losses:
            raise TypeError("the training losses step must return a dict with a 'total_loss' entry, got "
                            f"{type(losses).__name__}{'' if not isinstance(losses, Mapping) else list(losses)}")
        total = losses["total_loss"]
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            raise TypeError("'total_loss' must be a tensor that requires grad (computed from the network's output)")
        value = total.detach()
        if not torch.isfinite(value).all():
            raise FloatingPointError(f"the training loss became {float(value)} at step {self.global_step + 1}; "
                                     "lower the learning rate or check the data")
        return total

    def _criterion_loss(self, preds: Any, batch: Any) -> torch.Tensor:
        if self._criterion is None:
            raise ValueError(f"{type(self).__name__} has no criterion: pass one or override the losses steps")
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("the default losses step expects (inputs, targets) batches; override it for others")
        return self._criterion(preds, batch[1])

    @staticmethod
    def _accumulate(sums: dict[str, float], losses: Mapping[str, Any], metrics: Mapping[str, float],
                    size: int) -> None:
        for name, value in {**losses, **metrics}.items():
            sums[name] += float(value) * size

    def _means(self, sums: dict[str, float], count: int, prefix: str) -> dict[str, float]:
        totals = self.distributed.sum({**sums, "__count__": float(count)})
        count = totals.pop("__count__")
        if count == 0:
            raise ValueError(f"the {prefix} loader yielded no examples")
        return {f"{prefix}_{name}": value / count for name, value in totals.items()}

    def _step_scheduler_after_epoch(self, monitored: float) -> None:
        if self._scheduler is None:
            return
        if isinstance(self._scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self._scheduler.step(monitored)
        elif self.scheduler_interval == "epoch":
            self._scheduler.step()

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_metric is None:
            return True
        return value < self.best_metric if self.monitor_mode == "min" else value > self.best_metric

    def _save_checkpoints(self, metrics: Mapping[str, float]) -> None:
        improved = self._improved(metrics[self.monitor])
        if improved:
            self.best_metric = metrics[self.monitor]
        if not self._checkpoints_folder or not self.distributed.is_main:
            return
        state = self.checkpoint_state()
        save_checkpoint(state, os.path.join(self._checkpoints_folder, LATEST_NAME))
        if improved:
            save_checkpoint(state, os.path.join(self._checkpoints_folder, BEST_NAME))

    def _resume(self, resume: bool | str | os.PathLike) -> None:
        if resume is True:
            if not self._checkpoints_folder:
                raise CheckpointError("resume=True needs a checkpoints_folder to resume from")
            path = os.path.join(self._checkpoints_folder, LATEST_NAME)
            if not os.path.exists(path):
                if self.verbose and self.distributed.is_main:
                    tqdm.write(f"no checkpoint at {path} yet: starting from the first epoch")
                return
        else:
            path = os.fspath(resume)
        self.load_checkpoint(path)
        if self.verbose and self.distributed.is_main:
            tqdm.write(f"resumed from {path} after epoch {self.epoch} (step {self.global_step})")

    def _steps_exhausted(self) -> bool:
        return self.max_steps is not None and self.global_step >= self.max_steps

    def _loader_generators(self) -> list[torch.Generator]:
        generator = getattr(self._train_loader, "generator", None)
        return [generator] if isinstance(generator, torch.Generator) else []

    @contextlib.contextmanager
    def _plain_network(self) -> Iterator[None]:
        """Point ``self._network`` at the unwrapped network (evaluation needs no gradient synchronisation and its
        shards may be uneven)."""
        self._network = self.network
        try:
            yield
        finally:
            self._network = self._training_network

    def _log(self, metrics: Mapping[str, float], epoch: int) -> None:
        if self._tbx_writer is None:
            return
        for key, value in metrics.items():
            if key == "epoch":
                continue
            split, _, name = key.partition("_")
            tag = f"{split}/{name}" if split in ("train", "val", "eval") else key
            self._tbx_writer.add_scalar(tag, value, epoch)

    @staticmethod
    def _writer(tbx_writer: Any) -> Any:
        if isinstance(tbx_writer, (str, os.PathLike)):
            from tensorboardX import SummaryWriter

            return SummaryWriter(logdir=os.fspath(tbx_writer))
        if tbx_writer is not None and not callable(getattr(tbx_writer, "add_scalar", None)):
            raise TypeError(f"tbx_writer must be a tensorboardX SummaryWriter, a log directory or None, got "
                            f"{type(tbx_writer).__name__}")
        return tbx_writer


def parameters_of(optimizers: Iterable[torch.optim.Optimizer]) -> list[nn.Parameter]:
    """Every parameter the optimisers update."""
    return [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
