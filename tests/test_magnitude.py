"""Magnitude pruning: masks against brute-force thresholds, masks held through fine-tuning, make_permanent,
physical row removal against zeroed rows, 2:4 masks, the sparsity report and the CSR export."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from amc.models import SmallVGG
from compressors import CompressionError, MagnitudePruning
from compressors.magnitude import effective_weight, weight_nodes
from compressors.sparsity_report import export_csr, sparsity_report
from graph.serialization import load
from trainers.finetune import finetune


def _data(shape=(1, 8, 8), count=48, classes=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, *shape, generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    return images, DataLoader(TensorDataset(images, labels), batch_size=16)


class MLP(nn.Module):
    """Linear -> ReLU -> Linear -> ReLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 32), nn.Linear(32, 24), nn.Linear(24, 5)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_local_l1_zeroes_the_smallest_weights_of_each_layer():
    images, loader = _data()
    model = SmallVGG(1, 10)
    pruner = MagnitudePruning(model, loader, sparsity={"features.*": 0.5, "classifier.*": 0.9})
    network = pruner.compress()
    originals = dict(model.named_modules())
    for name, module in weight_nodes(network).items():
        target = 0.5 if name.startswith("features") else 0.9
        weight = originals[name].weight.detach()
        threshold = weight.abs().flatten().sort().values[int(round(target * weight.numel())) - 1]
        expected = weight.abs() > threshold
        assert torch.equal(module.weight_mask.bool(), expected), name


def test_global_scope_uses_one_threshold_across_layers():
    images, loader = _data()
    model = SmallVGG(1, 10)
    network = MagnitudePruning(model, loader, sparsity=0.7, scope="global").compress()
    pooled = torch.cat([m.weight.detach().abs().flatten() for m in model.modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear))])
    threshold = pooled.sort().values[int(round(0.7 * pooled.numel())) - 1]
    for name, module in weight_nodes(network).items():
        original = dict(model.named_modules())[name].weight.detach()
        assert torch.equal(module.weight_mask.bool(), original.abs() > threshold), name
    sparsities = [1 - m.weight_mask.float().mean().item() for m in weight_nodes(network).values()]
    assert max(sparsities) - min(sparsities) > 0.2


def test_masks_stay_applied_through_fine_tuning_and_their_gradients_are_zero():
    images, loader = _data()
    pruner = MagnitudePruning(SmallVGG(1, 10), loader, sparsity=0.6)
    network = pruner.compress()
    masks = {name: m.weight_mask.clone().bool() for name, m in weight_nodes(network).items()}
    start = {name: effective_weight(m).clone() for name, m in weight_nodes(network).items()}
    finetune(network, loader, epochs=2, lr=0.1)
    for name, module in weight_nodes(network).items():
        weight = effective_weight(module)
        assert torch.all(weight[~masks[name]] == 0), name
        assert not torch.equal(weight[masks[name]], start[name][masks[name]]), name
    network.train()
    network(images[:8]).sum().backward()
    for name, module in weight_nodes(network).items():
        assert torch.all(module.weight_orig.grad[~masks[name]] == 0), name


def test_make_permanent_leaves_a_plain_network_with_identical_outputs_that_saves(tmp_path):
    images, loader = _data()
    pruner = MagnitudePruning(SmallVGG(1, 10), loader, sparsity=0.5, method="random", seed=3)
    network = pruner.compress().eval()
    expected = network(images)
    plain = pruner.make_permanent()
    assert not any(hasattr(m, "weight_orig") or hasattr(m, "weight_mask") for m in plain.modules())
    assert not any(m._forward_pre_hooks for m in plain.modules())
    torch.testing.assert_close(plain(images), expected, rtol=0, atol=0)
    for suffix in ("pkl", "json", "vnmodel"):
        path = plain.save(pkl=str(tmp_path / f"net.{suffix}")) if suffix == "pkl" else (
            plain.save_to_json(file=str(tmp_path / "net.json")) if suffix == "json"
            else plain.save_to_vnmodel(pkl=str(tmp_path / "net.vnmodel")))
        torch.testing.assert_close(load(path)(images), expected)


@pytest.mark.parametrize("suffix", ["pkl", "json", "vnmodel"])
def test_a_masked_network_saves_what_it_computes_and_stays_masked(tmp_path, suffix):
    images, loader = _data()
    network = MagnitudePruning(SmallVGG(1, 10), loader, sparsity=0.7).compress().eval()
    expected = network(images)
    save = {"pkl": network.save, "json": network.save_to_json, "vnmodel": network.save_to_vnmodel}[suffix]
    loaded = load(save(str(tmp_path / f"net.{suffix}")))
    torch.testing.assert_close(loaded(images), expected)
    assert all(hasattr(m, "weight_mask") for m in weight_nodes(network).values())
    assert sparsity_report(loaded).sparsity == pytest.approx(0.7, abs=0.01)


def test_random_method_zeroes_exactly_the_asked_fraction():
    images, loader = _data()
    network = MagnitudePruning(SmallVGG(1, 10), loader, sparsity=0.3, method="random").compress()
    for module in weight_nodes(network).values():
        assert int((module.weight_mask == 0).sum()) == int(round(0.3 * module.weight_mask.numel()))


def test_ln_structured_zeroes_whole_rows_of_smallest_norm():
    images, loader = _data(shape=(12,), classes=5)
    model = MLP()
    network = MagnitudePruning(model, loader, sparsity={"fc1": 0.25}, method="ln_structured", n=2).compress()
    norms = model.fc1.weight.detach().norm(dim=1)
    dropped = set(torch.argsort(norms)[:8].tolist())
    rows_zero = {i for i in range(32) if torch.all(network.nodes["fc1"].weight[i] == 0)}
    assert rows_zero == dropped


def test_physical_structured_pruning_removes_rows_and_next_columns_exactly():
    images, loader = _data(shape=(12,), classes=5)
    model = MLP().eval()
    network = MagnitudePruning(model, loader, sparsity={"fc1": 0.25, "fc2": 0.5}, method="ln_structured",
                               physical=True).compress()
    assert network.nodes["fc1"].weight.shape == (24, 12)
    assert network.nodes["fc2"].weight.shape == (12, 24)
    assert network.nodes["fc3"].weight.shape == (5, 12)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for layer, count in ((zeroed.fc1, 8), (zeroed.fc2, 12)):
            rows = torch.argsort(layer.weight.norm(dim=1))[:count]
            layer.weight[rows] = 0
            layer.bias[rows] = 0
    torch.testing.assert_close(network(images), zeroed(images), rtol=1e-5, atol=1e-6)


def test_two_four_masks_keep_two_of_every_four_weights():
    images, loader = _data()
    network = MagnitudePruning(SmallVGG(1, 10), loader, sparsity={"features.[1-9]*": 0.5, "classifier.*": 0.5},
                               method="2:4").compress()
    for name, module in weight_nodes(network).items():
        if name == "features.0.0":
            continue
        blocks = module.weight_mask.reshape(module.weight_mask.shape[0], -1, 4)
        assert torch.all(blocks.sum(-1) == 2), name


def test_custom_score_function_decides_what_is_kept():
    images, loader = _data()
    model = SmallVGG(1, 10)
    network = MagnitudePruning(model, loader, sparsity={"classifier.2": 0.5},
                               method=lambda weight: -weight.abs()).compress()
    weight = model.classifier[2].weight.detach().abs()
    mask = network.nodes["classifier_2"].weight_mask.bool()
    assert weight[mask].max() <= weight[~mask].min()


@pytest.mark.parametrize("options, message", [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity={"nope.*": 0.5}), "matches no conv or linear node"),
    (dict(scope="everywhere"), "scope"),
    (dict(method="l3"), "unknown method"),
    (dict(scope="global", sparsity={"features.*": 0.5}), "global scope"),
    (dict(method="l1", physical=True), "physical"),
])
def test_bad_arguments_give_clear_errors(options, message):
    images, loader = _data()
    with pytest.raises(CompressionError, match=message):
        MagnitudePruning(SmallVGG(1, 10), loader, **options)


def test_two_four_on_a_layer_that_cannot_hold_it_names_the_node():
    images, loader = _data()
    with pytest.raises(CompressionError, match="features.0.0"):
        MagnitudePruning(SmallVGG(1, 10), loader, sparsity=0.5, method="2:4").compress()


def test_sparsity_report_counts_zeros_and_csr_export_round_trips(tmp_path):
    images, loader = _data()
    pruner = MagnitudePruning(SmallVGG(1, 10), loader, sparsity=0.8)
    network = pruner.compress()
    report = sparsity_report(network)
    weights = {name: effective_weight(m) for name, m in weight_nodes(network).items()}
    assert report.total("zeros") == sum(int((w == 0).sum()) for w in weights.values())
    assert report.total("dense_bytes") == sum(w.numel() * 4 for w in weights.values())
    assert report.total("zip_bytes") < 0.5 * report.total("dense_bytes")
    assert report.sparsity == pytest.approx(0.8, abs=0.01)
    path = export_csr(network, tmp_path / "sparse.pt")
    saved = torch.load(path, weights_only=True)
    for name, weight in weights.items():
        dense = saved[name]["csr"].to_dense().reshape(saved[name]["shape"])
        assert torch.equal(dense, weight)
    assert "total" in str(report)
    np.testing.assert_equal(sorted(saved), sorted(weights))
