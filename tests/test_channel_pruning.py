"""ChannelPruning (LASSO selection + least-squares reconstruction): the solvers against problems with known answers,
a residual + concat CNN trained on digits, a tiny Llama's MLP, the user's own class back, and argument checks."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import hf_models
from amc.models import ResidualConcatCNN
from compressors import ChannelPruning, ChannelPrunning
from compressors.base import CompressionError, recalibrate_batchnorm, top1_accuracy
from compressors.channel_pruning import least_squares_refit, select_channels
from compressors.features import collect_layer_statistics
from graph import capture
from graph.pruning import multiply_adds, plan_by_ratio, plan_for_flops, prune_channels
from trainers import finetune


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(module: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = module.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------------ the solvers
def test_lasso_selection_recovers_a_known_sparse_support():
    rng = np.random.default_rng(0)
    contributions = rng.standard_normal((400, 12))
    support = [1, 4, 7, 10]
    target = contributions[:, support] @ np.array([1.0, 0.8, 1.2, 0.6]) + 0.01 * rng.standard_normal(400)
    kept = select_channels(contributions.T @ contributions, contributions.T @ target, keep=4, n_samples=400)
    assert kept.tolist() == support


def test_lasso_selection_fills_up_with_the_strongest_when_channels_contribute_nothing():
    rng = np.random.default_rng(1)
    contributions = rng.standard_normal((200, 6)) * np.array([1, 0, 0, 3, 0, 2])
    target = contributions[:, 3]
    kept = select_channels(contributions.T @ contributions, contributions.T @ target, keep=3)
    assert kept.tolist() == [0, 3, 5]


def test_least_squares_refit_recovers_the_exact_weights_when_removed_channels_contribute_nothing():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1)).eval()
    with torch.no_grad():
        original[2].weight[:, 5:] = 0  # channels 5, 6, 7 feed nothing
    perturbed = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1)).eval()
    perturbed[0].load_state_dict(original[0].state_dict())  # same inputs to the last conv, other weights there
    inputs = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    reference, network = capture(original, inputs[0]), capture(perturbed, inputs[0])
    stats = collect_layer_statistics(network, ["2"], inputs, reference=reference, append_ones=True)["2"]
    kept = torch.arange(5 * 9)  # the unfolded columns of input channels 0..4, then the bias column
    solution = least_squares_refit(stats.xtx, stats.xty, torch.cat([kept, torch.tensor([8 * 9])]))
    expected = original[2].weight.detach().reshape(5, -1)[:, :45].T.double()
    assert torch.allclose(solution[:-1], expected, atol=1e-5)
    assert torch.allclose(solution[-1], original[2].bias.detach().double(), atol=1e-5)


def test_channels_that_feed_nothing_are_pruned_and_the_output_is_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(5 * 36, 4)).eval()
    with torch.no_grad():
        model[2].weight[:, [1, 3, 6]] = 0
    images = torch.randn(48, 3, 6, 6)
    loader = DataLoader(TensorDataset(images, torch.zeros(48, dtype=torch.long)), batch_size=16)
    compressor = ChannelPruning(model, loader, compress_ratio={"2": 3 / 8}, recalibrate_bn=False)
    pruned = compressor.compress()
    assert compressor.plan == {0: [1, 3, 6]}
    assert pruned.module_of(pruned.node("2")).weight.shape[1] == 5
    assert torch.allclose(pruned(images), model(images), atol=1e-4)


# ------------------------------------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def trained_cnn(digits):
    torch.manual_seed(0)
    model = ResidualConcatCNN(1, 10, width=16)
    finetune(model, digits.train, epochs=3, lr=0.05)
    return model.eval()


def test_residual_concat_cnn_meets_the_macs_target_and_keeps_accuracy(digits, trained_cnn):
    before = _state(trained_cnn)
    compressor = ChannelPrunning(trained_cnn, digits.train, digits.val, flops_target=0.5, trainset_ratio=0.5)
    origin_before = _state(compressor.origin_net)
    pruned = compressor.compress()
    original_macs = multiply_adds(compressor.origin_net)
    assert abs(multiply_adds(pruned) / original_macs - 0.5) <= 0.05 * 0.5
    original_accuracy = top1_accuracy(trained_cnn, digits.test)
    accuracy = top1_accuracy(pruned, digits.test)
    assert accuracy >= original_accuracy - 0.05, (original_accuracy, accuracy)
    # Weight-norm pruning of the same network to the same MACs, with the same BN recalibration, does worse.
    l2 = prune_channels(compressor.origin_net, plan_for_flops(compressor.origin_net, 0.5))
    recalibrate_batchnorm(l2, (x for x, _ in digits.train))
    assert accuracy > top1_accuracy(l2, digits.test)
    assert _same_state(trained_cnn, before) and _same_state(compressor.origin_net, origin_before)
    # The groups feeding several layers were chosen jointly for all of them.
    shared = [e for e in compressor.log if len(e.get("consumers", [])) > 1]
    assert {"block1.conv1.0", "branch_a.0", "branch_b.0.0"} in [set(e["consumers"]) for e in shared]
    assert all(max(e["relative_error_refit"][i] - e["relative_error_masked"][i] for i in range(len(e["consumers"])))
               <= 1e-9 for e in compressor.log if e.get("selection") == "lasso")
    # The user's own class back, holding the reconstructed weights.
    model = compressor.compressed_model()
    assert type(model) is ResidualConcatCNN and _same_state(trained_cnn, before)
    images = next(iter(digits.test))[0]
    assert torch.allclose(model(images), pruned(images), atol=1e-4)


def test_checkpoint_folder_gets_the_network_and_a_json_log(digits, trained_cnn, tmp_path):
    compressor = ChannelPruning(trained_cnn, digits.train, compress_ratio={"down.conv2.0": 0.5}, trainset_ratio=0.2,
                                checkpointfolder=tmp_path / "run")
    pruned = compressor.compress()
    log = json.loads((tmp_path / "run" / "compress_log.json").read_text())
    assert log["compressor"] == "ChannelPruning" and log["macs_after"] < log["macs_before"]
    assert [e["group"] for e in log["layers"] if "group" in e] == list(compressor.plan)
    from graph.serialization import load

    saved = load(os.fspath(tmp_path / "run" / "compressed.pkl"))
    images = next(iter(digits.test))[0]
    assert torch.equal(saved(images), pruned(images))


def test_accuracy_first_leaves_a_group_intact_when_accuracy_falls_below_the_threshold(digits, trained_cnn):
    original = top1_accuracy(trained_cnn, digits.val)
    compressor = ChannelPruning(trained_cnn, digits.train, digits.val, compress_ratio={"fc": 0.95},
                                trainset_ratio=0.2, accuracy_first=True, accuracy_threshold=original)
    pruned = compressor.compress()
    entries = [e for e in compressor.log if "accuracy_first" in e]
    assert entries, compressor.log
    assert all("threshold" in e["accuracy_first"] for e in entries)
    assert pruned.module_of(pruned.node("fc")).weight.shape[1] > 32 - int(32 * 0.95)  # less than asked, or nothing


# ------------------------------------------------------------------------------------------------ transformers
def test_llama_mlp_reconstruction_beats_l2_pruning_on_the_calibration_tokens():
    model = hf_models.llama()
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, hf_models.VOCAB, (8, 16)), "use_cache": False} for _ in range(4)]
    down = {f"model.layers.{i}.mlp.down_proj": 0.5 for i in range(hf_models.LAYERS)}
    compressor = ChannelPruning(model, batches, compress_ratio=down, sampled_pixels_per_img=16)
    pruned = compressor.compress()
    origin = compressor.origin_net
    attention = [f"model.layers.{i}.self_attn.o_proj" for i in range(hf_models.LAYERS)]
    l2 = prune_channels(origin, plan_by_ratio(origin, 0.5, ignore=attention))
    assert multiply_adds(l2) == multiply_adds(pruned) < multiply_adds(origin)

    def outputs(network: nn.Module, name: str) -> torch.Tensor:
        seen = []
        with torch.no_grad():
            for batch in batches:
                network.observe(lambda node, args, kwargs, out: seen.append(out) if node.name == name else None,
                                **batch)
        return torch.cat(seen)

    def error(network: nn.Module, name: str) -> float:
        expected = outputs(origin, name)
        return float((outputs(network, name) - expected).square().sum() / expected.square().sum())

    for name in [*down, "lm_head"]:
        assert error(pruned, name) < 0.9 * error(l2, name), name
    back = compressor.compressed_model()
    assert type(back).__name__ == "LlamaForCausalLM" and back.config.intermediate_size == hf_models.INTERMEDIATE // 2
    assert torch.allclose(back(**batches[0]).logits, pruned(**batches[0]).logits, atol=1e-4)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_arguments_give_clear_errors(digits, trained_cnn):
    def make(**kwargs):
        options = dict(trainloader=digits.train, compress_ratio=0.5)
        options.update(kwargs)
        return ChannelPruning(trained_cnn, **options)

    for ratio in (1.5, 0, -0.2, float("nan")):
        with pytest.raises(CompressionError, match="compress_ratio"):
            make(compress_ratio=ratio)
    with pytest.raises(CompressionError, match="'nope'.*not a compressible node"):
        make(compress_ratio={"nope": 0.5})
    with pytest.raises(CompressionError, match="exactly one of"):
        make(compress_ratio=None)
    with pytest.raises(CompressionError, match="exactly one of"):
        make(flops_target=0.5)
    with pytest.raises(CompressionError, match="flops_target"):
        make(compress_ratio=None, flops_target=1.0)
    with pytest.raises(CompressionError, match="sampled_pixels_per_img"):
        make(sampled_pixels_per_img=0)
    with pytest.raises(CompressionError, match="lars_alpha_init"):
        make(lars_alpha_init=-1)
    with pytest.raises(CompressionError, match="no batches"):
        make(trainloader=DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8)), batch_size=4))
    with pytest.raises(CompressionError, match="call compress"):
        make().compressed_model()
    nan_images = torch.full((8, 1, 8, 8), float("nan"))
    with pytest.raises(CompressionError, match="NaN or inf"):
        make(trainloader=DataLoader(TensorDataset(nan_images, torch.zeros(8, dtype=torch.long)), batch_size=4)
             ).compress()
