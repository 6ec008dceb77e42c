"""Turning global channel scores into a plan that meets a MACs budget: rounding of kept counts and the exactness
and minimality of the bisection, checked on real pruned networks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from amc.models import UNet
from compressors.budget import plan_from_count, plan_to_macs, rounded_keep
from graph import capture
from graph.pruning import multiply_adds, prune_channels


@pytest.mark.parametrize("size, keep, round_to, expected", [
    (32, 13, 8, 16), (32, 11, 8, 8), (32, 2, 8, 8), (32, 32, 8, 32), (30, 29, 8, 30),
    (8, 3, 8, 8), (6, 1, 8, 6), (32, 0, None, 1), (32, 13, None, 13)])
def test_rounded_keep_rounds_to_multiples_and_leaves_groups_no_larger_than_round_to_whole(size, keep, round_to,
                                                                                          expected):
    assert rounded_keep(size, keep, round_to) == expected


def _unet_and_scores(seed: int):
    torch.manual_seed(seed)
    rnet = capture(UNet(1, 2, widths=(16, 32, 64)).eval(), torch.randn(2, 1, 16, 16))
    rng = np.random.default_rng(seed)
    scores = {g: rng.random(g.size) for g in rnet.channel_groups() if g.prunable}
    return rnet, scores


def test_plan_to_macs_meets_the_target_on_the_real_network_with_the_fewest_channels_removed():
    rnet, scores = _unet_and_scores(0)
    target = 0.5 * multiply_adds(rnet)
    plan = plan_to_macs(rnet, scores, target)
    assert multiply_adds(prune_channels(rnet, plan)) <= target
    removed = sum(len(v) for v in plan.values())
    fewer = plan_from_count(scores, removed - 1)
    assert multiply_adds(prune_channels(rnet, fewer)) > target
    lowest = {g: set(np.argsort(s, kind="stable")[:len(plan.get(g, []))].tolist()) for g, s in scores.items()}
    assert all(set(indices) == lowest[g] for g, indices in plan.items())


def test_repeated_rounds_with_round_to_keep_every_width_a_multiple_of_it():
    rnet, scores = _unet_and_scores(1)
    original = multiply_adds(rnet)
    for fraction in (0.7, 0.45, 0.3):
        plan = plan_to_macs(rnet, scores, fraction * original, round_to=8)
        rnet = prune_channels(rnet, plan)
        assert multiply_adds(rnet) <= fraction * original
        rng = np.random.default_rng(int(fraction * 100))
        scores = {g: rng.random(g.size) for g in rnet.channel_groups() if g.prunable}
        assert all(g.size % 8 == 0 for g in scores), [g.size for g in scores]
