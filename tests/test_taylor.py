"""Taylor importance against a hand computation, its use as a ``graph.prune`` importance, and the iterative
Taylor pruning loop reaching its MACs target on a residual network and on a UNet with skip concatenations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from amc.models import ResidualConcatCNN, UNet
from compressors import CompressionError, TaylorPruning
from compressors.taylor import TaylorImportance, macs_share_per_channel
from graph import capture, prune
from graph.pruning import multiply_adds


class TwoConvs(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> global mean -> Linear: two prunable groups with known activations."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1), nn.Linear(3, 5)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


def _hand_taylor(model: TwoConvs, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Molchanov's criterion computed directly on the activations the next layers read: c1's ReLU output (read by
    c2) and the pooled c2 features (read by fc)."""
    a = F.relu(model.c1(x))
    a.retain_grad()
    pooled = F.relu(model.c2(a)).mean((2, 3))
    pooled.retain_grad()
    F.cross_entropy(model.fc(pooled), y).backward()
    first = (a * a.grad).mean((2, 3)).abs().mean(0)
    second = (pooled * pooled.grad).abs().mean(0)
    return first.detach(), second.detach()


def _two_convs(seed: int, batch: int):
    """A seeded :class:`TwoConvs` in eval mode, a batch of inputs and labels, and its captured network."""
    torch.manual_seed(seed)
    model = TwoConvs().eval()
    x, y = torch.randn(batch, 2, 5, 5), torch.randint(0, 5, (batch,))
    return model, x, y, capture(model, x)


def test_taylor_importance_equals_hand_computation_per_example_then_averaged():
    model, x, y, rnet = _two_convs(seed=0, batch=6)
    scores = TaylorImportance([(x, y)], normalize=False).raw_scores(rnet)
    first, second = _hand_taylor(model, x, y)
    by_nodes = {tuple(g.nodes): g.id for g in rnet.channel_groups()}
    np.testing.assert_allclose(scores[by_nodes[("c1", "c2")]], first.numpy(), rtol=1e-5)
    np.testing.assert_allclose(scores[by_nodes[("c2", "fc")]], second.numpy(), rtol=1e-5)


def test_taylor_importance_averages_batches_and_normalises_per_group():
    torch.manual_seed(1)
    model = TwoConvs().eval()
    batches = [(torch.randn(4, 2, 5, 5), torch.randint(0, 5, (4,))) for _ in range(3)]
    rnet = capture(model, batches[0][0])
    group = next(g for g in rnet.channel_groups() if g.nodes == ["c1", "c2"])
    per_batch = [_hand_taylor(model, x, y)[0].numpy() for x, y in batches]
    expected = np.mean(per_batch, axis=0)
    np.testing.assert_allclose(TaylorImportance(batches)(rnet, group), expected, rtol=1e-5)
    np.testing.assert_allclose(TaylorImportance(batches, normalize="l2")(rnet, group),
                               expected / np.linalg.norm(expected), rtol=1e-5)
    beta = 0.5
    smoothed = per_batch[0]
    for value in per_batch[1:]:
        smoothed = beta * smoothed + (1 - beta) * value
    raw = TaylorImportance(batches, moving_average=beta, normalize=False).raw_scores(rnet)[group.id]
    np.testing.assert_allclose(raw, smoothed, rtol=1e-5)


def test_rms_normalisation_gives_every_group_unit_root_mean_square_whatever_its_width():
    model, x, y, rnet = _two_convs(seed=1, batch=4)
    raw = TaylorImportance([(x, y)], normalize=None).scores(rnet)
    rms = TaylorImportance([(x, y)], normalize="rms").scores(rnet)
    for gid, scores in raw.items():
        np.testing.assert_allclose(rms[gid], scores / np.sqrt(np.mean(scores ** 2)), rtol=1e-6)
        assert np.sqrt(np.mean(rms[gid] ** 2)) == pytest.approx(1.0)


def test_flops_regulariser_lowers_scores_by_each_channels_macs_share():
    model, x, y, rnet = _two_convs(seed=2, batch=4)
    group = next(g for g in rnet.channel_groups() if g.nodes == ["c1", "c2"])
    share = macs_share_per_channel(rnet, [group])[group.id]
    # one c1 channel costs c1's MACs / 4 plus c2's MACs / 4 (it is one of c2's 4 input channels)
    macs_c1, macs_c2 = 4 * 25 * 2 * 9 * 4, 4 * 25 * 3 * 4 * 9
    assert share == pytest.approx((macs_c1 / 4 + macs_c2 / 4) / multiply_adds(rnet))
    plain = TaylorImportance([(x, y)])(rnet, group)
    regularised = TaylorImportance([(x, y)], flops_regularization=2.0)(rnet, group)
    total = sum(scores.sum() for scores in TaylorImportance([(x, y)]).scores(rnet).values())
    np.testing.assert_allclose(regularised, plain / total - 2.0 * share, rtol=1e-6)


def test_taylor_importance_plugs_into_graph_prune():
    model, x, y, rnet = _two_convs(seed=3, batch=4)
    importance = TaylorImportance([(x, y)])
    pruned = prune(rnet, channel_ratio=0.5, importance=importance)
    group = next(g for g in rnet.channel_groups() if g.nodes == ["c1", "c2"])
    kept = np.sort(np.argsort(importance(rnet, group))[2:])
    assert pruned.nodes["c1"].weight.shape[0] == 2
    torch.testing.assert_close(pruned.nodes["c1"].weight, model.c1.weight[torch.as_tensor(kept)])


def _loader(images: torch.Tensor, labels: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=False)


def test_taylor_pruning_reaches_the_macs_target_on_a_residual_concat_network():
    torch.manual_seed(4)
    images, labels = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    model = ResidualConcatCNN(1, 10, width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = _loader(images, labels)
    taylor = TaylorPruning(model, loader, loader, flops_target=0.5, round_to=4, steps=2, finetune_steps=2,
                           taylor_batches=2)
    pruned = taylor.compress()
    ratio = multiply_adds(pruned) / multiply_adds(taylor.origin_net)
    assert 0.4 <= ratio <= 0.5
    assert pruned(images[:3]).shape == (3, 10)
    assert [entry["step"] for entry in taylor.history] == [0, 1, 2]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_taylor_pruning_reaches_the_macs_target_on_a_unet_with_skip_concats():
    torch.manual_seed(5)
    images = torch.randn(32, 1, 16, 16)
    masks = (images[:, 0] > 0).long()
    model = UNet(1, 2, widths=(8, 16, 32))
    loader = _loader(images, masks)
    taylor = TaylorPruning(model, loader, loader, flops_target=0.5, round_to=4, steps=2, finetune_steps=2,
                           taylor_batches=1)
    pruned = taylor.compress()
    assert multiply_adds(pruned) <= 0.5 * multiply_adds(taylor.origin_net)
    convs = [m for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert any(c.out_channels < o.out_channels for c, o in zip(convs, [m for m in model.modules()
                                                                      if isinstance(m, (nn.Conv2d,
                                                                                        nn.ConvTranspose2d))]))
    assert all(c.out_channels % 4 == 0 for c in convs if c.out_channels > 2)
    assert pruned(images[:2]).shape == (2, 2, 16, 16)


@pytest.mark.parametrize("options, message", [
    (dict(flops_target=1.5), "flops_target"),
    (dict(round_to=0), "round_to"),
    (dict(steps=0), "steps"),
    (dict(finetune_steps=-1), "finetune_steps"),
    (dict(normalize="max"), "normalize"),
    (dict(latency_regularization=-1.0), "latency_regularization"),
])
def test_taylor_pruning_rejects_bad_arguments(options, message):
    loader = _loader(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    with pytest.raises(CompressionError, match=message):
        TaylorPruning(ResidualConcatCNN(1, 10, width=8), loader, loader, **options)
