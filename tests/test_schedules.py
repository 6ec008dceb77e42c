"""Gradual sparsity schedules: the documented formulas at every step, and the sparsity the masks really have
while a trainer runs them as callbacks."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from amc.models import SmallVGG
from compressors import MagnitudePruning
from compressors.magnitude import weight_nodes
from compressors.schedules import CubicSchedule, GradualPruning, PaddleLogSchedule
from trainers.callbacks import Callback
from trainers.finetune import finetune


def test_paddle_log_schedule_follows_the_dynamic_pruning_hook_formula():
    schedule = PaddleLogSchedule(interval_pass=3, end_pass=60)
    for epoch in range(70):
        update = min(epoch, 60) // 3 * 3
        expected = 0.8 / math.log(60 / 3 + 2) * math.log(2 + update / 3)
        assert schedule.sparsity_at(epoch, 0.8) == pytest.approx(expected)
    assert schedule.sparsity_at(60, 0.8) == pytest.approx(0.8)
    assert schedule.sparsity_at(4, 0.8) == schedule.sparsity_at(3, 0.8) < schedule.sparsity_at(6, 0.8)


def test_cubic_schedule_follows_zhu_and_gupta():
    schedule = CubicSchedule(begin_step=10, end_step=110, frequency=20, initial_sparsity=0.1)
    for step in range(0, 130):
        if step < 10:
            expected = 0.0
        else:
            update = 10 + (min(step, 110) - 10) // 20 * 20
            expected = 0.9 + (0.1 - 0.9) * (1 - (update - 10) / 100) ** 3
        assert schedule.sparsity_at(step, 0.9) == pytest.approx(expected)
    assert schedule.sparsity_at(110, 0.9) == pytest.approx(0.9)


def _setup(sparsity):
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 1, 8, 8, generator=generator),
                                      torch.randint(0, 10, (64,), generator=generator)), batch_size=8)
    pruner = MagnitudePruning(SmallVGG(1, 10), loader, sparsity=sparsity)
    return pruner, loader


def _measured(network) -> dict[str, float]:
    return {name: 1 - m.weight_mask.float().mean().item() if hasattr(m, "weight_mask") else 0.0
            for name, m in weight_nodes(network).items()}


class Recorder(Callback):
    """Trainer callback recording every layer's real mask sparsity after each step."""

    def __init__(self, network):
        self.network, self.steps = network, {}

    def on_batch_end(self, trainer, step):
        self.steps[step] = _measured(self.network)


def test_cubic_callback_masks_have_the_scheduled_sparsity_at_each_step():
    pruner, loader = _setup({"features.*": 0.5, "classifier.*": 0.9})
    network = pruner.origin_net
    schedule = CubicSchedule(begin_step=0, end_step=12, frequency=4)
    gradual = GradualPruning(pruner, network, schedule)
    recorder = Recorder(network)
    finetune(network, loader, epochs=2, lr=0.01, callbacks=[gradual, recorder])
    assert len(recorder.steps) == 16
    for step, measured in recorder.steps.items():
        for name, value in measured.items():
            target = schedule.sparsity_at(step, pruner.targets[name])
            size = weight_nodes(network)[name].weight_mask.numel()
            assert value == pytest.approx(target, abs=1 / size), (step, name)
    assert [time for time, _ in gradual.history] == [0, 4, 8, 12]


def test_paddle_callback_updates_once_per_interval_of_epochs():
    pruner, loader = _setup(0.8)
    network = pruner.origin_net
    schedule = PaddleLogSchedule(interval_pass=2, end_pass=4)
    gradual = GradualPruning(pruner, network, schedule)
    seen = {}

    class AtEpochEnd(Recorder):
        def on_epoch_end(self, trainer, epoch, metrics):
            seen[epoch] = _measured(network)

    finetune(network, loader, epochs=6, lr=0.01, max_steps=6 * 8, callbacks=[gradual, AtEpochEnd(network)])
    assert [time for time, _ in gradual.history] == [0, 2, 4]
    for epoch, measured in seen.items():
        expected = schedule.sparsity_at(epoch, 0.8)
        assert all(value == pytest.approx(expected, abs=0.002) for value in measured.values()), epoch
    assert seen[5]["classifier.2"] == pytest.approx(0.8, abs=0.002)
