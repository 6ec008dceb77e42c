"""Low-rank decomposition: the solvers against independent computations (numpy SVD, explicit reconstructions), exact
full-rank rewrites of every supported layer kind, the compressor on a residual CNN trained on digits, and the
decomposed network as a first-class ReconstructedNetwork (save/load, ONNX, pruning)."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import graph
from amc.models import ResNet20
from compressors import LowRankDecomposition, LowRankDecompostion
from compressors.base import CompressionError, top1_accuracy
from compressors.low_rank_solvers import (Moments, RankCurve, ResponseSpace, allocate_ranks, data_factors,
                                          nonlinear_factors, truncated_svd, weight_svd_factors)


@pytest.fixture(scope="module")
def trained_resnet(digits):
    """A small CIFAR-style ResNet (widths 16-32-64, one block per stage) trained on digits for a few seconds."""
    torch.manual_seed(0)
    model = ResNet20(1, 10, width=16, blocks=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 4 * len(digits.train))
    model.train()
    for _ in range(4):
        for images, labels in digits.train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def correlated_inputs(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose covariance is dominated by a few directions (as real features are)."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, width, generator=generator, dtype=torch.float64)
    return torch.randn(rows, 4, generator=generator, dtype=torch.float64) @ basis * 3 \
        + 0.1 * torch.randn(rows, width, generator=generator, dtype=torch.float64)


def reconstruct(inputs: torch.Tensor, factors) -> torch.Tensor:
    """``L (R x) + b`` for one block, computed row-wise."""
    out = inputs @ factors.first.T @ factors.second.T
    return out + factors.bias if factors.bias is not None else out


# ---------------------------------------------------------------------------------------------- solvers
def test_truncated_svd_error_equals_discarded_singular_values():
    matrix = torch.randn(12, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    singular = np.linalg.svd(matrix.numpy(), compute_uv=False)
    for rank in (1, 4, 11):
        left, right, _ = truncated_svd(matrix, rank)
        error = float(((matrix - left @ right) ** 2).sum())
        assert error == pytest.approx(float((singular[rank:] ** 2).sum()), rel=1e-9)
        assert np.linalg.matrix_rank((left @ right).numpy()) == rank
    factors = weight_svd_factors(matrix, 1, 4, ResponseSpace.identity(12), None)
    assert factors.error == pytest.approx(float((singular[4:] ** 2).sum() / (singular ** 2).sum()), rel=1e-9)


def test_grouped_weight_svd_is_the_svd_of_each_group():
    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    factors = weight_svd_factors(weight, 2, 2, ResponseSpace.identity(8), None)
    for group in range(2):
        block = weight[4 * group:4 * group + 4].numpy()
        approx = factors.second[4 * group:4 * group + 4] @ factors.first[2 * group:2 * group + 2]
        singular = np.linalg.svd(block, compute_uv=False)
        assert float(((block - approx.numpy()) ** 2).sum()) == pytest.approx(float((singular[2:] ** 2).sum()))


def test_data_driven_error_is_at_most_weight_svd_error_on_correlated_responses():
    inputs = correlated_inputs(4000, 24)
    weight = torch.randn(16, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    bias = torch.randn(16, dtype=torch.float64)
    responses = inputs @ weight.T + bias
    moments = Moments.from_rows(responses, responses)
    for rank in (2, 4, 8):
        by_weight = weight_svd_factors(weight, 1, rank, ResponseSpace.identity(16), bias)
        by_data = data_factors(weight, bias, 1, rank, ResponseSpace.identity(16), moments)
        weight_error = float(((responses - reconstruct(inputs, by_weight)) ** 2).sum())
        data_error = float(((responses - reconstruct(inputs, by_data)) ** 2).sum())
        assert data_error <= weight_error * (1 + 1e-9)
        spread = float(((responses - responses.mean(0)) ** 2).sum())
        assert by_data.error == pytest.approx(data_error / spread, rel=1e-6, abs=1e-12)
    assert data_error < 0.5 * weight_error  # rank 8 > the 4 dominant input directions: nearly exact from data


def test_asymmetric_data_driven_fit_corrects_a_perturbed_input():
    inputs = correlated_inputs(4000, 24, seed=4)
    weight = torch.randn(16, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    target = inputs @ weight.T
    approx_inputs = inputs * 0.7  # what an earlier, already-compressed layer delivers
    approx = approx_inputs @ weight.T
    symmetric = data_factors(weight, None, 1, 6, ResponseSpace.identity(16), Moments.from_rows(approx, approx))
    asymmetric = data_factors(weight, None, 1, 6, ResponseSpace.identity(16), Moments.from_rows(approx, target))
    error = {name: float(((target - reconstruct(approx_inputs, f)) ** 2).sum())
             for name, f in (("symmetric", symmetric), ("asymmetric", asymmetric))}
    assert error["asymmetric"] < 0.1 * error["symmetric"]


def test_nonlinear_post_relu_error_is_at_most_linear_error():
    inputs = correlated_inputs(3000, 24, seed=6)
    weight = torch.randn(16, 24, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    responses = inputs @ weight.T + 0.5
    moments = Moments.from_rows(responses, responses)
    space = ResponseSpace.identity(16)
    for rank in (2, 3):
        linear = data_factors(weight, None, 1, rank, space, moments)
        nonlinear = nonlinear_factors(weight, None, 1, rank, space, moments, responses, responses, iterations=10)
        truth = responses.clamp(min=0)
        errors = [float(((truth - reconstruct(inputs, f).clamp(min=0)) ** 2).sum()) for f in (linear, nonlinear)]
        assert errors[1] <= errors[0] * (1 + 1e-9)
    assert errors[1] < errors[0]


def test_rank_allocation_meets_the_budget_and_cuts_the_concentrated_layer_most():
    concentrated = torch.tensor([[100.0, 1, 0.5, 0.2, 0.1, 0.1, 0.05, 0.05]])
    flat = torch.ones(1, 8)
    curves = {"concentrated": RankCurve(concentrated, 800.0, 100.0, 7), "flat": RankCurve(flat, 800.0, 100.0, 7)}
    ranks = allocate_ranks(curves, 600.0)
    assert sum(curves[name].macs(rank) for name, rank in ranks.items()) <= 600
    assert 0 < ranks["concentrated"] < ranks["flat"]
    best = max(((a, b) for a in range(0, 8) for b in range(0, 8)
                if curves["concentrated"].macs(a) + curves["flat"].macs(b) <= 600),
               key=lambda ab: curves["concentrated"].log_kept(ab[0]) + curves["flat"].log_kept(ab[1]))
    assert (ranks["concentrated"], ranks["flat"]) == best
    with pytest.raises(ValueError, match="cannot be met"):
        allocate_ranks(curves, 100.0)


# ---------------------------------------------------------------------------------------------- the rewrite
class EveryKind(nn.Module):
    """Grouped, strided, dilated, padded conv with bias and BN+ReLU; a Conv1d; Linear layers with and without bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=True)
        self.norm = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.reflect = nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect")
        self.line = nn.Conv1d(6, 10, 3, padding=1)
        self.fc = nn.Linear(10, 12)
        self.head = nn.Linear(12, 5, bias=False)

    def forward(self, x):
        x = self.reflect(self.relu(self.norm(self.conv(x))))
        x = self.line(x.flatten(2)).mean(-1)
        return self.head(torch.relu(self.fc(x)))


def every_kind():
    torch.manual_seed(8)
    model = EveryKind()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2)
        model.norm.weight.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.parametrize("method", ["weight", "data"])
def test_full_rank_decomposition_reproduces_the_original_outputs(method):
    model = every_kind()
    images = torch.randn(16, 4, 9, 9)
    loader = [(images[i:i + 8], torch.zeros(8, dtype=torch.long)) for i in (0, 8)]
    full = {"conv": 4, "reflect": 6, "line": 10, "fc": 10, "head": 5}
    compressor = LowRankDecomposition(model, loader, ranks=full, method=method, recalibrate_bn=False)
    network = compressor.compress()
    for name, rank in full.items():
        assert network.node(f"{name}.reduce").op == network.node(name + ".expand").op
        with pytest.raises(KeyError):
            network.node(name)
    reduce = network.module_of(network.node("conv.reduce"))
    expand = network.module_of(network.node("conv.expand"))
    assert (reduce.stride, reduce.padding, reduce.dilation, reduce.groups) == ((2, 2), (2, 2), (2, 2), 2)
    assert (reduce.out_channels, expand.groups, expand.bias is not None) == (8, 2, True)
    assert network.module_of(network.node("reflect.reduce")).padding_mode == "reflect"
    test = torch.randn(3, 4, 11, 11)
    torch.testing.assert_close(network(test), model(test), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- the compressor
@pytest.mark.parametrize("method,nonlinear", [("weight", False), ("data", False), ("data", True)])
def test_residual_cnn_on_digits_meets_the_macs_target_and_keeps_accuracy(trained_resnet, digits, method, nonlinear):
    before = copy.deepcopy(trained_resnet.state_dict())
    original = top1_accuracy(trained_resnet, digits.test)
    compressor = LowRankDecompostion(origin_net=trained_resnet, trainloader=digits.train, valloader=digits.val,
                                     trainset_ratio=0.3, sampled_pixels_per_img=8, flops_target=0.5, method=method,
                                     nonlinear_case=nonlinear)
    origin_state = copy.deepcopy(compressor.origin_net.state_dict())
    network = compressor.compress()
    ratio = network.flops().total_macs / compressor.origin_net.flops().total_macs
    assert 0.475 <= ratio <= 0.5
    accuracy = top1_accuracy(network, digits.test)
    # Stated bound: 2x fewer MACs without fine-tuning loses at most 8 points with weight SVD, 3 from data
    # (measured: 0.989 -> 0.955 weight, 0.978 data, 0.981 nonlinear).
    assert accuracy >= original - (0.08 if method == "weight" else 0.03), (original, accuracy)
    assert all(torch.equal(before[k], v) for k, v in trained_resnet.state_dict().items())
    assert all(torch.equal(origin_state[k], v) for k, v in compressor.origin_net.state_dict().items())
    assert any(entry.get("nonlinear") for entry in compressor.log) == nonlinear


def test_compress_ratio_removes_that_fraction_of_every_decomposed_layer(trained_resnet, digits):
    compressor = LowRankDecomposition(trained_resnet, digits.train, compress_ratio=0.6, method="weight")
    network = compressor.compress()
    before, after = compressor.origin_net.flops().by_node, network.flops().by_node
    layers = [entry for entry in compressor.log if "node" in entry]
    assert len(layers) == len(compressor.candidates) > 5
    for entry in layers:
        name = entry["node"]
        kept = (after[name + ".reduce"].macs + after[name + ".expand"].macs) / before[name].macs
        assert kept <= 0.4 + 1e-9
        assert kept * (entry["rank"] + 1) / entry["rank"] > 0.4  # the largest rank within the ratio


def test_accuracy_first_raises_the_rank_of_a_layer_that_drops_below_the_threshold(trained_resnet, digits):
    threshold = top1_accuracy(trained_resnet, digits.val) - 0.05
    plain = LowRankDecomposition(trained_resnet, digits.train, ranks={"fc": 1}, method="weight",
                                 recalibrate_bn=False).compress()
    assert top1_accuracy(plain, digits.val) < threshold  # so accuracy_first must act on fc
    compressor = LowRankDecomposition(trained_resnet, digits.train, digits.val, ranks={"fc": 1}, method="weight",
                                      accuracy_first=True, accuracy_threshold=threshold, recalibrate_bn=False)
    network = compressor.compress()
    (entry,) = compressor.log
    if entry["kept"] if "kept" in entry else False:
        assert entry["accuracy"] < threshold
        torch.testing.assert_close(network(torch.ones(2, 1, 8, 8)), trained_resnet(torch.ones(2, 1, 8, 8)))
    else:
        assert entry["rank"] > 1 and entry["accuracy"] >= threshold
    assert top1_accuracy(network, digits.val) >= threshold


def test_decomposed_network_saves_loads_exports_onnx_draws_and_prunes(trained_resnet, digits, tmp_path):
    compressor = LowRankDecomposition(trained_resnet, digits.train, compress_ratio=0.5, method="weight",
                                      checkpointfolder=tmp_path / "checkpoint")
    network = compressor.compress()
    images = next(iter(digits.test))[0][:4]
    expected = network(images)
    log = json.loads((tmp_path / "checkpoint" / "compress_log.json").read_text())
    assert {entry["node"] for entry in log["layers"] if "node" in entry} == set(compressor.candidates)
    assert log["macs_after"] == network.flops().total_macs < log["macs_before"]
    torch.testing.assert_close(graph.serialization.load(str(tmp_path / "checkpoint" / "compressed.pkl"))(images),
                               expected)
    for path in (network.save(pkl=str(tmp_path / "n.pkl")), network.save_to_json(file=str(tmp_path / "n.json")),
                 network.save_to_vnmodel(pkl=str(tmp_path / "n.vnmodel"), model_base_size_hw=(8, 8))):
        torch.testing.assert_close(graph.serialization.load(path)(images), expected)
    onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export check needs onnxruntime")
    onnx_path = network.export_onnx(str(tmp_path / "n.onnx"))
    session = onnxruntime.InferenceSession(onnx_path)
    feed = {session.get_inputs()[0].name: images.numpy()}
    np.testing.assert_allclose(session.run(None, feed)[0], expected.detach().numpy(), rtol=1e-4, atol=1e-4)
    rank_group = next(g for g in network.channel_groups()
                      if g.prunable and g.nodes[0] == "layers.0.conv1.0.reduce")
    pruned = network.prune_channels({rank_group: [0]})
    assert pruned.module_of(pruned.node("layers.0.conv1.0.expand")).in_channels == rank_group.size - 1
    assert pruned.flops().total_macs < network.flops().total_macs
    if shutil.which("dot"):
        assert (tmp_path / "n.svg").name in network.draw(str(tmp_path / "n.svg"))


def test_bad_arguments_give_clear_errors(trained_resnet, digits):
    def make(**kwargs):
        return LowRankDecomposition(trained_resnet, kwargs.pop("loader", digits.train), **kwargs)

    with pytest.raises(CompressionError, match="compress_ratio must be in"):
        make(compress_ratio=1.5)
    with pytest.raises(CompressionError, match="not a compressible node"):
        make(compress_ratio={"nope": 0.5})
    with pytest.raises(CompressionError, match="not both"):
        make(compress_ratio=0.5, flops_target=0.5)
    with pytest.raises(CompressionError, match="give compress_ratio"):
        make()
    with pytest.raises(CompressionError, match="method must be"):
        make(compress_ratio=0.5, method="svd")
    with pytest.raises(CompressionError, match="nonlinear_case"):
        make(compress_ratio=0.5, method="weight", nonlinear_case=True)
    with pytest.raises(CompressionError, match="sampled_pixels_per_img"):
        make(compress_ratio=0.5, sampled_pixels_per_img=0)
    with pytest.raises(CompressionError, match=r"ranks\['fc'\] must be an integer in \[1, 10\]"):
        make(ranks={"fc": 11})
    with pytest.raises(CompressionError, match="not a decomposable node"):
        make(ranks={"layers.0.add": 1})
    with pytest.raises(CompressionError, match="cannot be met"):
        make(flops_target=0.01).compress()
    with pytest.raises(CompressionError, match="no batches"):
        make(compress_ratio=0.5, loader=[])
    with pytest.raises(CompressionError, match="NaN or inf"):
        make(compress_ratio=0.5, loader=[(torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4))]).compress()
