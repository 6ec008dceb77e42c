"""Ratio search (compressors.tuners): the action wall, the cost model, the state, the DDPG agent, the genetic
algorithm, the tuners end to end on digits, resuming and the command line."""
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from amc.models import build_model
from compressors.base import CompressionError, recalibrate_batchnorm, top1_accuracy
from compressors.tuners import DDPGTuner, GATuner
from compressors.tuners.actions import L2ChannelAction, action_class
from compressors.tuners.agent import DDPGAgent, DDPGConfig
from compressors.tuners.budget import ActionWall
from compressors.tuners.cost import MacsModel
from compressors.tuners.ddpg import run_episode
from compressors.tuners.genetic import GAConfig, GeneticAlgorithm
from compressors.tuners.latency import LatencyModel
from compressors.tuners.state import StateEncoder
from graph import capture
from graph.flops import count_flops
from graph.pruning import plan_for_flops, prune_channels
from trainers.datasets import load_dataset

GRAPHS = ("residual-concat", "resnet20", "mobilenet-v2-small")
ROUNDINGS = (None, 8)


@functools.lru_cache(maxsize=None)
def _wall_setup(name: str, round_to: int | None):
    torch.manual_seed(0)
    rnet = capture(build_model(name, 1, 10).eval(), torch.randn(2, 1, 12, 12))
    action = L2ChannelAction(rnet, round_to=round_to)
    return rnet, action, MacsModel(rnet, action.units, action.skeleton)


@settings(max_examples=15, deadline=None)
@given(graph=st.sampled_from(GRAPHS), round_to=st.sampled_from(ROUNDINGS), target=st.floats(0.2, 0.9),
       actions=st.lists(st.floats(0.0, 1.0), min_size=40, max_size=40))
def test_action_wall_keeps_every_policy_within_the_budget_counted_on_the_pruned_network(graph, round_to, target,
                                                                                        actions):
    rnet, action, model = _wall_setup(graph, round_to)
    budget = target * count_flops(rnet).total_macs
    try:
        wall = ActionWall(model, budget)
    except CompressionError:
        lowest = [unit.lowest for unit in action.units]
        assert count_flops(action.skeleton(lowest)).total_macs > budget
        return
    keeps = []
    for unit, ratio in zip(action.units, actions):
        keep = wall.clip(keeps, ratio)
        assert keep in unit.keeps
        keeps.append(keep)
    pruned = prune_channels(rnet, action.plan(keeps))
    counted = count_flops(pruned).total_macs
    assert counted <= budget
    assert model.cost(np.array(keeps)) == counted
    for unit, keep in zip(action.units, keeps):
        if round_to and keep != unit.size:
            assert keep % round_to == 0


def test_action_wall_clips_only_when_the_budget_needs_it():
    rnet, action, model = _wall_setup("resnet20", None)
    generous = ActionWall(model, 0.99 * model.full)
    assert generous.clip([], 0.9) == action.units[0].keep_for(0.9)
    tight = ActionWall(model, 0.25 * model.full)
    keeps = tight.repair([1.0] * len(action.units))
    assert count_flops(prune_channels(rnet, action.plan(keeps))).total_macs <= 0.25 * model.full
    assert keeps[0] == action.units[0].size  # the first unit may stay whole: later ones are squeezed
    assert sum(k < u.size for k, u in zip(keeps, action.units)) >= len(keeps) // 2


def test_unreachable_budget_is_refused_with_the_lowest_cost():
    _, _, model = _wall_setup("resnet20", 8)
    with pytest.raises(CompressionError, match="cannot be met"):
        ActionWall(model, 0.01 * model.full)


class TwoConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_state_features_of_a_two_conv_network_match_a_hand_computation():
    rnet = capture(TwoConvNet().eval(), torch.randn(2, 1, 8, 8))
    action = L2ChannelAction(rnet, lbound=0.25)
    assert [u.name for u in action.units] == ["conv1", "conv2"]
    encoder = StateEncoder(MacsModel(rnet, action.units, action.skeleton))
    conv1, conv2, fc = 2 * 64 * 8 * 9, 2 * 16 * 16 * 8 * 9, 2 * 16 * 10
    full = conv1 + conv2 + fc
    first = encoder.state([], 1.0)
    # index, type (both conv), in (1 vs 8), out (8 vs 16), stride (1 vs 2), kernel (3 vs 3), MACs of the unit's
    # layers (conv1 + conv2 vs conv2 + fc), reduced, remaining (conv2 + fc), previous action
    np.testing.assert_allclose(first, [0, 0, 0, 0, 0, 0, 1, 0, (conv2 + fc) / full, 1], atol=1e-6)
    second = encoder.state([4], 0.5)
    reduced = (conv1 / 2 + conv2 / 2) / full
    np.testing.assert_allclose(second, [1, 0, 1, 1, 1, 0, 0, reduced, 0, 0.5], atol=1e-6)
    assert np.all((first >= 0) & (first <= 1)) and np.all((second >= 0) & (second <= 1))


class TargetEnv:
    """Four steps; the reward is minus the squared distance of the actions to fixed targets."""

    targets = np.array([0.3, 0.8, 0.5, 0.9])

    class Outcome:
        def __init__(self, reward):
            self.reward = reward

    def reset(self):
        self.actions = []
        return self._state()

    def _state(self):
        state = np.zeros(5, np.float32)
        state[min(len(self.actions), 3)] = 1
        state[4] = self.actions[-1] if self.actions else 1.0
        return state

    def step(self, action):
        self.actions.append(action)
        return self._state(), len(self.actions) == 4

    def finish(self, index):
        return self.Outcome(-float(np.sum((np.array(self.actions) - self.targets) ** 2)))


def test_ddpg_agent_learns_the_actions_of_a_toy_problem_with_a_known_optimum():
    torch.manual_seed(0)
    env = TargetEnv()
    agent = DDPGAgent(5, 4, DDPGConfig(warmup=20, delta_decay=0.95, lbound=0.0), seed=0)
    for episode in range(150):
        run_episode(env, agent, episode)
    first = TargetEnv()
    run_episode(first, DDPGAgent(5, 4, DDPGConfig(warmup=20, lbound=0.0), seed=0), 150, learn=False)
    learned = run_episode(env, agent, 150, learn=False)
    np.testing.assert_allclose(env.actions, TargetEnv.targets, atol=0.1)
    assert learned.reward > 4 * first.finish(0).reward  # the untrained actor was far off


def test_genetic_algorithm_finds_the_optimum_of_a_separable_fitness():
    target = np.array([0.25, 0.9, 0.6, 0.4, 0.75, 0.5])
    ga = GeneticAlgorithm(6, 0.0, 1.0, 24, np.random.default_rng(0), GAConfig(mutation_sigma=0.05, mutation_rate=0.3))
    genes, fitness = ga.evolve(lambda g: (g, -float(np.sum((g - target) ** 2))), 60)
    np.testing.assert_allclose(genes, target, atol=0.05)
    assert fitness > -0.005


@functools.lru_cache(maxsize=None)
def _digits_model():
    from trainers import finetune

    torch.manual_seed(0)
    data = load_dataset("digits", batch_size=32)
    model = build_model("residual-concat", 1, 10)
    finetune(model, data.train, epochs=4, lr=0.05)
    return model.eval(), data


def _heldout_accuracy(network, data, calibration):
    network = network.eval()
    recalibrate_batchnorm(network, iter([calibration]))
    return top1_accuracy(network, data.val)


@pytest.mark.parametrize("tuner", ["ddpg", "ga"])
def test_short_search_on_digits_beats_the_uniform_policy_at_the_same_macs(tuner):
    model, data = _digits_model()
    episodes = 40 if tuner == "ddpg" else 24
    options = dict(flops_target=0.4, episodes=episodes, seed=0, round_to=2, heldout_images=300,
                   calibration_images=256)
    search = DDPGTuner(model, data.train, data.val, warmup=20, **options) if tuner == "ddpg" else \
        GATuner(model, data.train, data.val, population=8, **options)
    result = search.search()
    rnet = capture(model, torch.randn(2, 1, 8, 8))
    original = count_flops(rnet).total_macs
    assert count_flops(result.compressed_net).total_macs <= 0.4 * original
    assert len(result.history) == episodes
    calibration = torch.cat([data.train.dataset[i][0][None] for i in range(256)])
    uniform = prune_channels(rnet, plan_for_flops(rnet, 0.4, round_to=2))
    searched = _heldout_accuracy(result.compressed_net, data, calibration)
    assert searched > _heldout_accuracy(uniform, data, calibration)


@pytest.mark.parametrize("tuner", ["ddpg", "ga"])
def test_a_stopped_search_resumes_to_the_same_history_as_an_uninterrupted_one(tmp_path, tuner):
    model, data = _digits_model()

    def make(episodes, folder, target=0.5):
        options = dict(flops_target=target, episodes=episodes, seed=3, round_to=4, heldout_images=128,
                       calibration_images=64, checkpointfolder=folder)
        if tuner == "ddpg":
            return DDPGTuner(model, data.train, data.val, warmup=3, batch_size=8, **options)
        return GATuner(model, data.train, data.val, population=2, **options)

    make(4, tmp_path / "a").search()
    resumed = make(6, tmp_path / "a").search()
    straight = make(6, tmp_path / "b").search()
    assert [e.keeps for e in resumed.history] == [e.keeps for e in straight.history]
    assert [e.accuracy for e in resumed.history] == [e.accuracy for e in straight.history]
    assert (tmp_path / "a" / "search_result.json").exists()
    assert list((tmp_path / "a" / "tensorboard").iterdir())
    with pytest.raises(CompressionError, match="different search"):
        make(6, tmp_path / "a", target=0.3).search()


def test_masked_reward_equals_the_accuracy_of_the_pruned_network():
    model, data = _digits_model()
    search = DDPGTuner(model, data.train, data.val, flops_target=0.5, episodes=3, warmup=3, round_to=4,
                       heldout_images=300, calibration_images=128, evaluation="masked")
    result = search.search()
    assert result.accuracy == pytest.approx(result.best.accuracy, abs=1e-9)
    assert not math.isclose(result.macs_ratio, 1.0)


def test_unknown_compressor_names_the_choices():
    with pytest.raises(CompressionError, match="l2"):
        action_class("no-such-compressor")
    from compressors.channel_pruning import ChannelPruning

    assert action_class(ChannelPruning) is action_class("channel-pruning")


def test_latency_table_times_layers_of_the_shapes_the_pruned_network_has():
    from compressors.tuners.latency import resized_layer

    rnet, action, _ = _wall_setup("mobilenet-v2-small", 8)
    rng = np.random.default_rng(0)
    keeps = [int(rng.choice(unit.keeps)) for unit in action.units]
    pruned = prune_channels(rnet, action.plan(keeps))
    for node in rnet.graph_nodes:
        module = rnet.module_of(node) if node.key else None
        if isinstance(module, nn.Conv2d):
            small = pruned.module_of(pruned.node(node.name))
            rebuilt = resized_layer(module, small.in_channels, small.out_channels)
            assert rebuilt.weight.shape == small.weight.shape and rebuilt.groups == small.groups


def test_latency_budget_search_keeps_the_measured_latency_model_within_the_target(tmp_path):
    model, data = _digits_model()
    options = dict(episodes=4, population=2, round_to=16, heldout_images=64, calibration_images=32,
                   checkpointfolder=tmp_path / "new")
    # timings are noisy: measure the table once, then set a target the table can meet; the tuner reads the same
    # cached table, so its budget is feasible by construction
    probe = GATuner(model, data.train, data.val, flops_target=0.9, **options)
    measured = LatencyModel(probe.rnet, probe.units, cache=str(tmp_path / "new" / "latency_table.json"))
    lowest = measured.cost([u.lowest for u in measured.units]) / measured.full
    assert lowest < 1.0
    target = (lowest + 1.0) / 2
    search = GATuner(model, data.train, data.val, latency_target=target, **options)
    assert search.model.full == measured.full
    result = search.search()
    assert result.budget == "latency" and result.cost_ratio <= target + 1e-9
    assert (tmp_path / "new" / "latency_table.json").exists()


def test_accuracy_first_returns_the_smallest_budget_within_the_threshold():
    from compressors.tuners.accuracy_first import accuracy_first_search

    model, data = _digits_model()
    result = accuracy_first_search(GATuner, model, data.train, data.val, accuracy_threshold=0.05, steps=3,
                                   episodes=4, population=2, round_to=4, heldout_images=128,
                                   calibration_images=64)
    tried = result.extra["accuracy_first"]["tried"]
    assert result.accuracy >= result.original_accuracy - 0.05
    kept = [target for target, accuracy in tried if accuracy >= result.original_accuracy - 0.05]
    assert result.macs_ratio <= min(kept) + 1e-9
    assert all(accuracy < result.original_accuracy - 0.05 for target, accuracy in tried if target < min(kept))


def test_iterate_compresses_fine_tunes_and_compresses_again_to_a_fraction_of_the_original():
    from compressors.tuners.iterate import iterate

    model, data = _digits_model()
    original = count_flops(capture(model, torch.randn(2, 1, 8, 8))).total_macs
    results = iterate(GATuner, model, data.train, data.val, [0.7, 0.45], finetune_epochs=1, episodes=2,
                      population=2, round_to=4, heldout_images=64, calibration_images=64)
    assert count_flops(results[0].compressed_net).total_macs <= 0.7 * original
    final = results[-1].compressed_net
    assert count_flops(final).total_macs <= 0.45 * original
    assert top1_accuracy(final, data.val) > results[-1].accuracy - 0.02  # fine-tuned after the last search


def test_amc_search_command_saves_a_network_within_the_budget(tmp_path, capsys):
    from amc.cli import main
    from graph import load

    output = tmp_path / "searched.pkl"
    assert main(["search", "--tuner", "ga", "--episodes", "4", "--population", "2", "--train-epochs", "1",
                 "--heldout-images", "100", "--calibration-images", "64", "--flops-target", "0.5",
                 "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "held-out top-1" in printed and "MACs" in printed
    saved = load(str(output))
    original = capture(build_model("residual-concat", 1, 10).eval(), torch.randn(1, 1, 8, 8))
    assert count_flops(saved).total_macs <= 0.5 * count_flops(original).total_macs


def test_lasso_action_prunes_every_group_to_its_kept_count_with_refitted_weights():
    model, data = _digits_model()
    search = GATuner(model, data.train, data.val, compressor="channel-pruning", flops_target=0.5, episodes=2,
                     population=2, round_to=4, heldout_images=128, calibration_images=64)
    result = search.search()
    keeps = result.best.keeps
    for unit, keep in zip(search.units, keeps):
        assert result.compressed_net.module_of(result.compressed_net.node(unit.name)).out_channels == keep
    l2 = L2ChannelAction(search.rnet).compress(keeps)
    assert count_flops(l2).total_macs == result.macs <= 0.5 * count_flops(search.rnet).total_macs
    assert any(not torch.equal(a, b) for a, b in zip(l2.parameters(), result.compressed_net.parameters())
               if a.shape == b.shape)


def test_taylor_action_removes_each_groups_channels_of_lowest_taylor_importance_and_meets_the_budget():
    from compressors import TaylorPruning
    from compressors.taylor import TaylorImportance

    model, data = _digits_model()
    search = GATuner(model, data.train, data.val, compressor=TaylorPruning, flops_target=0.5, episodes=4,
                     population=2, round_to=4, heldout_images=128, calibration_images=64)
    result = search.search()
    assert result.macs <= 0.5 * count_flops(search.rnet).total_macs
    labelled = [(images, labels) for images, labels in _first_images(data.train, 64)]
    scores = TaylorImportance(labelled, normalize=False).raw_scores(search.rnet)
    plan = search.action.plan(result.best.keeps)
    assert plan
    for group, removed in plan.items():
        kept = np.setdiff1d(np.arange(group.size), removed)
        assert scores[group.id][removed].max() <= scores[group.id][kept].min()
    assert not np.array_equal(search.action.order[0], L2ChannelAction(search.rnet).order[0])


def _first_images(loader, count):
    taken = 0
    for images, labels in torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size):
        take = min(len(images), count - taken)
        yield images[:take], labels[:take]
        taken += take
        if taken >= count:
            return


def test_low_rank_action_models_the_macs_of_every_decomposed_network_exactly():
    from compressors.tuners.actions import WeightLowRankAction

    model, data = _digits_model()
    rnet = capture(model, torch.randn(2, 1, 8, 8))
    action = WeightLowRankAction(rnet, round_to=2)
    model_of_macs = action.macs_model()
    rng = np.random.default_rng(0)
    policies = [[u.lowest for u in action.units], [u.size for u in action.units]]
    policies += [[int(rng.choice(u.keeps)) for u in action.units] for _ in range(4)]
    for keeps in policies:
        assert model_of_macs.cost(keeps) == count_flops(action.compress(keeps)).total_macs
    assert all(k % 2 == 0 or k == u.size for u in action.units for k in u.keeps)


def test_low_rank_search_meets_the_budget_and_its_fast_reward_equals_a_full_evaluation():
    from torch.utils.data import DataLoader, Subset

    from compressors import LowRankDecomposition

    model, data = _digits_model()
    search = GATuner(model, data.train, data.val, compressor=LowRankDecomposition, flops_target=0.5, episodes=4,
                     population=2, heldout_images=128, calibration_images=64)
    result = search.search()
    original = count_flops(search.rnet).total_macs
    assert count_flops(result.compressed_net).total_macs == result.macs <= 0.5 * original
    assert any(node.name.endswith(".reduce") for node in result.compressed_net.graph_nodes)
    heldout = DataLoader(Subset(data.val.dataset, range(128)), batch_size=32)
    assert top1_accuracy(result.compressed_net, heldout) == pytest.approx(result.accuracy, abs=1e-9)
    with pytest.raises(CompressionError, match="flops_target"):
        GATuner(model, data.train, data.val, compressor="low-rank-weight", latency_target=0.5, episodes=1)
    with pytest.raises(CompressionError, match="not a node"):
        GATuner(model, data.train, data.val, compressor="low-rank-weight", ignore=["no_such_layer"], episodes=1)


def test_onnxruntime_latency_timer_times_a_layer():
    pytest.importorskip("onnxruntime", reason="the onnxruntime latency backend needs onnxruntime")
    from compressors.tuners.latency import time_onnxruntime

    seconds = time_onnxruntime(nn.Conv2d(8, 8, 3, padding=1).eval(), torch.randn(1, 8, 16, 16), 3)
    assert 0 < seconds < 1


def test_bad_search_arguments_are_refused_with_the_argument_named():
    model, data = _digits_model()
    for options, message in ((dict(flops_target=1.5), "flops_target"), (dict(episodes=0), "episodes"),
                             (dict(reward="speed"), "reward"), (dict(heldout_images=0), "heldout_images"),
                             (dict(latency_target=0.5, reward="error-log-macs"), "defined on MACs"),
                             (dict(round_to=0), "round_to"), (dict(ignore=["no.such.node"]), "ignore")):
        with pytest.raises((CompressionError, ValueError), match=message):
            DDPGTuner(model, data.train, data.val, **options)


def test_baselines_probe_one_group_at_a_time_and_keep_every_policy_within_the_budget():
    from compressors.tuners import RandomSearchTuner, SensitivityTuner

    model, data = _digits_model()
    options = dict(flops_target=0.5, round_to=4, heldout_images=128, calibration_images=64)
    sensitivity = SensitivityTuner(model, data.train, data.val, levels=(0.25, 0.5), **options)
    result = sensitivity.search()
    sizes = [unit.size for unit in sensitivity.units]
    probes = result.history[:-1]
    assert len(probes) == 2 * len(sizes)
    assert all(sum(k < s for k, s in zip(e.keeps, sizes)) == 1 for e in probes)
    assert result.best is result.history[-1] and result.best.cost_ratio <= 0.5
    random = RandomSearchTuner(model, data.train, data.val, episodes=5, **options).search()
    assert all(e.cost_ratio <= 0.5 for e in random.history) and random.evaluations == 5
