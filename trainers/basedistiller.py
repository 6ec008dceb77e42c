"""``BaseDistiller``: knowledge distillation from the original network (teacher) into the compressed one (student).

The training loss is ``alpha * T² * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * criterion(student,
labels) + hint_weight * Σ MSE(adapter(student_feature), teacher_feature)``: Hinton's temperature-softened logits
(the T² keeps their gradients on the scale of the hard loss) plus optional FitNets-style feature hints between
nodes of the same name in both networks (capture keeps node names, so a pruned network's ``layer1.0.conv1`` still
matches the original's). Where pruning left the student with fewer channels than the teacher, a learned 1×1
adapter (a 1×1 convolution for ``(N, C, H, W)`` features, a linear map on the last dimension otherwise) maps them
up; it trains with its own optimiser that follows the main learning rate, and is saved in the checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from compressors.base import batch_inputs, run_network, to_device
from graph.network import ReconstructedNetwork
from trainers.classification import ClassificationTrainer

Hints = Sequence[str] | Mapping[str, str]


def soft_logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over the class dimension (dim 1), summed over classes
    and averaged over every other position (the batch; pixels too for dense logits)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    student_log = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher_log = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(dim=1)
    return kl.mean() * temperature ** 2


def _conv_adapter(student_channels: int, teacher_channels: int) -> nn.Module:
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)


def _linear_adapter(student_channels: int, teacher_channels: int) -> nn.Module:
    return nn.Linear(student_channels, teacher_channels, bias=False)


ADAPTERS: dict[int, tuple[int, Callable[[int, int], nn.Module]]] = {
    4: (1, _conv_adapter),
    3: (-1, _linear_adapter),
    2: (-1, _linear_adapter),
}
"""Per feature rank: the channel dimension and the adapter factory ``(student_channels, teacher_channels)``."""


def hint_adapter(student_shape: torch.Size, teacher_shape: torch.Size, name: str) -> nn.Module:
    """The adapter from a student feature of ``student_shape`` to the teacher's ``teacher_shape``: ``nn.Identity``
    when they match, a 1×1 map of the channel dimension when only it differs; ``ValueError`` otherwise."""
    if student_shape == teacher_shape:
        return nn.Identity()
    if len(student_shape) != len(teacher_shape) or len(student_shape) not in ADAPTERS:
        raise ValueError(f"hint {name!r}: student feature {tuple(student_shape)} and teacher feature "
                         f"{tuple(teacher_shape)} cannot be matched (supported ranks: {sorted(ADAPTERS)})")
    channel_dim, factory = ADAPTERS[len(student_shape)]
    others = [d for d in range(len(student_shape)) if d != channel_dim % len(student_shape)]
    if any(student_shape[d] != teacher_shape[d] for d in others):
        raise ValueError(f"hint {name!r}: student feature {tuple(student_shape)} and teacher feature "
                         f"{tuple(teacher_shape)} differ outside the channel dimension {channel_dim}")
    return factory(student_shape[channel_dim], teacher_shape[channel_dim])


def feature_module(network: nn.Module, name: str) -> nn.Module:
    """The module whose output is the feature called ``name``: a node of a ``ReconstructedNetwork`` (``layer1.0.conv1``,
    ``layer1.0.add``) or a submodule path of any other module; ``KeyError`` listing some valid names otherwise."""
    if isinstance(network, ReconstructedNetwork):
        try:
            return network.module_of(network.node(name))
        except KeyError:
            names = [node.name for node in network.layer_nodes]
    else:
        modules = dict(network.named_modules())
        if name in modules and name:
            return modules[name]
        names = [key for key in modules if key]
    raise KeyError(f"no node named {name!r} for a feature hint (some names: {', '.join(names[:8])})")


class _FeatureTap:
    """Forward hooks that keep the latest output of named modules while ``active``."""

    def __init__(self, network: nn.Module, names: Sequence[str]):
        self.features: dict[str, torch.Tensor] = {}
        self.active = False
        self.handles = [feature_module(network, name).register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.active:
                if not isinstance(output, torch.Tensor):
                    raise TypeError(f"hint {name!r}: the node returns {type(output).__name__}, not a tensor")
                self.features[name] = output
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The features captured since the last call (then forgotten)."""
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()


class BaseDistiller(ClassificationTrainer):
    """Trains the student ``network`` to match ``teacher`` (the original network; a deep copy is used, in eval mode
    without grad, so the caller's module is never modified). Takes :class:`~trainers.basetrainer.BaseTrainer`'s
    arguments plus, keyword-only: ``teacher``, ``temperature`` (T > 0), ``alpha`` (weight of the soft loss in
    [0, 1]), ``hints`` (node names present in both networks, or ``{student_name: teacher_name}``) and
    ``hint_weight`` (raw-feature MSE runs several times the soft loss, so the default 0.1 keeps hints from
    dominating: on digits, ResNet-20 at half its channels, one epoch from a 0.97 teacher, test top-1 was 0.67
    fine-tuned, 0.84 distilled, 0.74 with two hints at weight 1, 0.86 at 0.1). The loss dict logs ``total_loss``, ``kd_loss``, ``task_loss``, ``hint_loss`` and one
    ``hint_<name>`` per hint; validation and best checkpoint use the student's top-1 as in
    :class:`~trainers.classification.ClassificationTrainer`.
    """

    def __init__(self, *args: Any, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9,
                 hints: Hints = (), hint_weight: float = 0.1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if hint_weight < 0:
            raise ValueError(f"hint_weight must be non-negative, got {hint_weight}")
        self.teacher = copy.deepcopy(teacher).to(self._device).eval().requires_grad_(False)
        self.temperature, self.alpha, self.hint_weight = float(temperature), float(alpha), float(hint_weight)
        self.hints: dict[str, str] = dict(hints) if isinstance(hints, Mapping) else {name: name for name in hints}
        self.adapters = nn.ModuleDict()
        self.adapter_optimizer: torch.optim.Optimizer | None = None
        if self.hints:
            self._build_adapters()

    # ------------------------------------------------------------------ the steps
    def train_losses(self, preds: Any, batch: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The distillation losses of one training batch (see the module docstring)."""
        with torch.no_grad():
            teacher_logits = run_network(self.teacher, batch_inputs(batch))
        losses = {"kd_loss": soft_logit_kl(preds, teacher_logits, self.temperature),
                  "task_loss": self._criterion_loss(preds, batch)}
        total = self.alpha * losses["kd_loss"] + (1 - self.alpha) * losses["task_loss"]
        if self.hints:
            student_features, teacher_features = self._student_tap.take(), self._teacher_tap.take()
            hint_losses = {f"hint_{name}": F.mse_loss(self.adapters[self._adapter_key(name)](
                student_features[name]).float(), teacher_features[teacher_name].float())
                for name, teacher_name in self.hints.items()}
            losses["hint_loss"] = sum(hint_losses.values())
            losses.update(hint_losses)
            total = total + self.hint_weight * losses["hint_loss"]
        return {"total_loss": total, **losses}

    def run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """:meth:`BaseTrainer.run` with the feature-hint hooks attached for the duration of the run."""
        with self._taps():
            return super().run(*args, **kwargs)

    # ------------------------------------------------------------------ extension points
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The network's optimiser and, when hints need adapters, theirs."""
        return [self._optimizer] + ([self.adapter_optimizer] if self.adapter_optimizer is not None else [])

    def before_optimizer_step(self) -> None:
        """Average the adapters' gradients over processes and give them the main learning rate."""
        if self.adapter_optimizer is not None:
            self.distributed.average_gradients(list(self.adapters.parameters()))
            for group in self.adapter_optimizer.param_groups:
                group["lr"] = self._optimizer.param_groups[0]["lr"]
        super().before_optimizer_step()

    def extra_state(self) -> dict[str, Any]:
        """The adapters' weights and optimiser state."""
        return {"adapters": self.adapters.state_dict(),
                "adapter_optimizer": self.adapter_optimizer.state_dict() if self.adapter_optimizer else None}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore the adapters' weights and optimiser state."""
        self.adapters.load_state_dict(state["adapters"])
        if self.adapter_optimizer is not None and state["adapter_optimizer"] is not None:
            self.adapter_optimizer.load_state_dict(state["adapter_optimizer"])

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _adapter_key(name: str) -> str:
        return name.replace(".", "__")

    @contextlib.contextmanager
    def _taps(self) -> Iterator[None]:
        if not self.hints:
            yield
            return
        self._student_tap = _FeatureTap(self.network, list(self.hints))
        self._teacher_tap = _FeatureTap(self.teacher, list(self.hints.values()))
        self._student_tap.active = self._teacher_tap.active = True
        try:
            yield
        finally:
            self._student_tap.remove()
            self._teacher_tap.remove()

    def _build_adapters(self) -> None:
        """Run student and teacher once on the first training batch to read each hint's feature shapes, then
        make the adapters (and their optimiser, a copy of the main one's class and settings)."""
        inputs = None
        for batch in self._train_loader:
            inputs = to_device(batch_inputs(batch), self._device)
            break
        if inputs is None:
            raise ValueError("train_loader yielded no batches")
        was_training = self.network.training
        self.network.eval()
        try:
            with self._taps(), torch.no_grad():
                run_network(self.network, inputs)
                run_network(self.teacher, inputs)
                student, teacher = self._student_tap.take(), self._teacher_tap.take()
        finally:
            self.network.train(was_training)
        for name, teacher_name in self.hints.items():
            adapter = hint_adapter(student[name].shape, teacher[teacher_name].shape, name)
            self.adapters[self._adapter_key(name)] = adapter.to(self._device)
        parameters = list(self.adapters.parameters())
        if parameters:
            settings = {**self._optimizer.defaults, "lr": self._optimizer.param_groups[0]["lr"]}
            self.adapter_optimizer = type(self._optimizer)(parameters, **settings)
