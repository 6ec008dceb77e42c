"""What every ratio-search agent shares: capture the network, set up the action (the compressor), the cost model
and the action wall, the fast held-out evaluator and the reward; run the agent's loop with a tqdm bar, tensorboardX
curves and a resumable checkpoint; build the compressed network at the best policy.

Subclasses (:class:`~compressors.tuners.ddpg.DDPGTuner`, :class:`~compressors.tuners.genetic.GATuner` …)
implement :meth:`SearchTuner.run_agent`, and ``agent_state``/``load_agent_state`` for resuming.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from compressors.base import CompressionError, as_network, batch_inputs, check_ratio
from graph.flops import count_flops
from graph.network import ReconstructedNetwork
from graph.serialization.atomic import atomic_path

from .actions import ChannelAction, action_class
from .budget import ActionWall
from .cost import CostModel
from .env import Episode, PolicyScorer
from .evaluation import PolicyEvaluator, first_batches
from .rewards import reward_function
from .state import StateEncoder

STATE_FILE = "search_state.pt"
RESULT_FILE = "search_result.json"


@dataclass
class SearchResult:
    """The outcome of a search. ``ratios``/``keeps``: preserve ratio and kept count per unit (named by the node
    producing the channel group); ``compressed_net``: the network at the best policy; ``macs`` and ``macs_ratio``
    of it (counted, not estimated); ``accuracy``: its held-out accuracy (the reward's images); ``history``: every
    episode; ``best``: the best one; ``evaluations``: distinct policies evaluated; ``seconds``: search time."""

    ratios: dict[str, float]
    keeps: dict[str, int]
    compressed_net: ReconstructedNetwork
    macs: int
    macs_ratio: float
    accuracy: float
    original_accuracy: float
    history: list[Episode]
    best: Episode
    evaluations: int
    seconds: float
    budget: str = "macs"
    cost_ratio: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (everything but the network)."""
        return {"ratios": self.ratios, "keeps": self.keeps, "macs": self.macs, "macs_ratio": self.macs_ratio,
                "accuracy": self.accuracy, "original_accuracy": self.original_accuracy, "budget": self.budget,
                "cost_ratio": self.cost_ratio, "evaluations": self.evaluations, "seconds": self.seconds,
                "best": self.best.to_dict(), "history": [episode.to_dict() for episode in self.history],
                **self.extra}

    def __str__(self) -> str:
        rows = [f"{'unit':40s} {'kept':>6s} {'ratio':>6s}"]
        rows += [f"{name[:40]:40s} {self.keeps[name]:6d} {ratio:6.3f}" for name, ratio in self.ratios.items()]
        rows.append(f"MACs {self.macs:,} ({self.macs_ratio:.3f} of the original), held-out accuracy "
                    f"{self.accuracy:.4f} (original {self.original_accuracy:.4f}), {len(self.history)} episodes, "
                    f"{self.evaluations} evaluations, {self.seconds:.1f} s")
        return "\n".join(rows)


def example_inputs(loader: DataLoader) -> Any:
    """Two examples of the loader's first batch (capture needs sizes of at least 2 to replay at any batch)."""
    for batch in loader:
        inputs = batch_inputs(batch)
        if isinstance(inputs, torch.Tensor):
            return inputs[:2]
        raise CompressionError("the search needs loaders whose inputs are single tensors")
    raise CompressionError("trainloader yielded no batches")


class SearchTuner:
    """Base of the ratio-search agents.

    ``origin_net``: an ``nn.Module`` (captured from a deep copy; never modified) or a ``ReconstructedNetwork``.
    ``trainloader``: calibration data (BatchNorm re-estimation, data-driven compressors); ``valloader``: the
    held-out split of the *training* data the reward is measured on (``heldout_images`` of it) — never the test
    set. ``flops_target``: the fraction of the original MACs to keep; or ``latency_target``: the fraction of the
    measured CPU latency (:mod:`compressors.tuners.latency`). ``compressor``: a name (``"l2"``, ``"taylor"``,
    ``"channel-pruning"``, see :data:`compressors.tuners.actions.ACTIONS`), a compressor class or an adapter class.
    ``episodes``: policies to try. ``checkpointfolder``: where the resumable state, tensorboardX curves and the
    result go. ``round_to``: channel counts kept at multiples of it; ``lbound``: the lowest preserve ratio;
    ``reward``: ``"accuracy"`` or ``"error-log-macs"``; ``ignore``: node names whose groups stay whole;
    ``evaluation``: ``"pruned"`` (rewards on the physically compressed network, the faster on CPU) or ``"masked"``
    (on a copy of the original masked in place; channel actions only).
    """

    name = "search"

    def __init__(self, origin_net: nn.Module, trainloader: DataLoader, valloader: DataLoader,
                 flops_target: float = 0.5, compressor: Any = "l2", episodes: int = 300, seed: int = 0,
                 checkpointfolder: str | os.PathLike | None = None, device: torch.device | str | None = None,
                 verbose: bool = False, *, latency_target: float | None = None, round_to: int | None = None,
                 lbound: float = 0.2, reward: str = "accuracy", heldout_images: int = 500,
                 calibration_images: int = 256, ignore: Sequence[str] = (), latency_backend: str = "torch",
                 evaluation: str = "pruned"):
        if trainloader is None or valloader is None:
            raise CompressionError("the search needs a trainloader (calibration) and a valloader (the held-out split "
                                   "of the training data the reward is measured on)")
        if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
            raise CompressionError(f"episodes must be a positive integer, got {episodes!r}")
        for label, count, least in (("heldout_images", heldout_images, 1),
                                    ("calibration_images", calibration_images, 0)):
            if isinstance(count, bool) or not isinstance(count, int) or count < least:
                raise CompressionError(f"{label} must be an integer of at least {least}, got {count!r}")
        self.budget_kind = "latency" if latency_target is not None else "macs"
        self.target = check_ratio("latency_target" if latency_target is not None else "flops_target",
                                  latency_target if latency_target is not None else flops_target)
        self.reward_name, self.reward = reward, reward_function(reward)
        if reward == "error-log-macs" and self.budget_kind == "latency":
            raise CompressionError("the accuracy-guaranteed reward -error*log(MACs) is defined on MACs; use "
                                   "reward='accuracy' with a latency_target")
        self.episodes, self.seed, self.verbose = episodes, int(seed), verbose
        self.checkpointfolder = os.fspath(checkpointfolder) if checkpointfolder is not None else None
        if self.checkpointfolder:
            os.makedirs(self.checkpointfolder, exist_ok=True)
        self.device = torch.device(device) if device is not None else None
        self.trainloader, self.valloader = trainloader, valloader
        self.compressor, self.round_to, self.lbound, self.ignore = compressor, round_to, lbound, tuple(ignore)
        self.latency_backend = latency_backend
        self.heldout_images, self.calibration_images = heldout_images, calibration_images
        self.rnet = as_network(origin_net, example_inputs(trainloader))
        if self.device is not None:
            self.rnet.to(self.device)
        self.rnet.eval()
        adapter = action_class(compressor)
        batches = first_batches(trainloader, max(calibration_images, 1), self.device, labelled=adapter.needs_labels)
        calibration = [inputs for inputs, _ in batches]
        self.action = adapter(self.rnet, [batch if adapter.needs_labels else batch[:1] for batch in batches],
                              lbound=lbound, round_to=round_to, ignore=self.ignore, device=self.device,
                              evaluation=evaluation)
        self.units = self.action.units
        self.model = self._cost_model()
        self.wall = ActionWall(self.model, self.target * self.model.full)
        self.encoder = StateEncoder(self.model)
        heldout = first_batches(valloader, heldout_images, self.device, labelled=True)
        has_norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.rnet.modules())
        self.evaluator = PolicyEvaluator(self.action.reference, heldout,
                                         calibration if calibration_images and has_norms else None)
        self.scorer = PolicyScorer(self.wall, lambda keeps: self.action.accuracy(keeps, self.evaluator), self.reward)
        self.original_accuracy = self.evaluator.accuracy(len(self.rnet.graph_nodes))
        self.history: list[Episode] = []
        self.best: Episode | None = None
        self.elapsed = 0.0
        self._writer = None
        self._bar = None

    # ------------------------------------------------------------------ setup
    def _cost_model(self) -> CostModel:
        if self.budget_kind == "macs":
            return self.action.macs_model()
        if not isinstance(self.action, ChannelAction):
            raise CompressionError(f"a latency budget is measured per channel count; the {self.compressor!r} "
                                   "action changes ranks: give it a flops_target")
        from .latency import LatencyModel

        return LatencyModel(self.rnet, self.units, backend=self.latency_backend,
                            cache=os.path.join(self.checkpointfolder, "latency_table.json")
                            if self.checkpointfolder else None)

    def generator(self) -> np.random.Generator:
        """A numpy generator of the tuner's seed and kind (so the GA's initial population and random search's
        policies are different draws at one seed)."""
        return np.random.default_rng([self.seed, zlib.crc32(self.name.encode())])

    def signature(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the tuner, units, budget, compressor, reward and seed."""
        compressor = self.compressor if isinstance(self.compressor, str) else self.compressor.__name__
        return {"tuner": type(self).__name__, "units": [[u.name, u.size, u.keeps.tolist()] for u in self.units],
                "budget": self.budget_kind, "target": self.target, "compressor": compressor,
                "reward": self.reward_name, "seed": self.seed}

    # ------------------------------------------------------------------ the agent's side
    def run_agent(self) -> None:
        """Run the agent until ``episodes`` are in :attr:`history` (continuing a resumed one), calling
        :meth:`record` after each episode."""
        raise NotImplementedError

    def agent_state(self) -> dict[str, Any]:
        """The agent's state for the checkpoint."""
        raise NotImplementedError

    def load_agent_state(self, state: dict[str, Any]) -> None:
        """Restore the agent from :meth:`agent_state`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ bookkeeping
    def record(self, episode: Episode, checkpoint: bool = True) -> None:
        """Add an episode to the history, update the best, the bar and the curves; checkpoint if asked."""
        self.history.append(episode)
        if self.best is None or episode.reward > self.best.reward:
            self.best = episode
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(reward=f"{episode.reward:.4f}", best=f"{self.best.accuracy:.4f}",
                                  cost=f"{episode.cost_ratio:.3f}")
        if self._writer is not None:
            step = episode.index
            self._writer.add_scalar("search/reward", episode.reward, step)
            self._writer.add_scalar("search/accuracy", episode.accuracy, step)
            self._writer.add_scalar("search/best_accuracy", self.best.accuracy, step)
            self._writer.add_scalar(f"search/{self.budget_kind}_ratio", episode.cost_ratio, step)
        if checkpoint:
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """Write the resumable state atomically (nothing without a ``checkpointfolder``)."""
        if not self.checkpointfolder:
            return
        state = {"signature": self.signature(), "history": [e.to_dict() for e in self.history],
                 "elapsed": self.elapsed + self._running(), "agent": self.agent_state()}
        with atomic_path(os.path.join(self.checkpointfolder, STATE_FILE)) as temporary:
            torch.save(state, temporary)

    def _running(self) -> float:
        return time.perf_counter() - self._started if getattr(self, "_started", None) else 0.0

    def _resume(self) -> None:
        path = os.path.join(self.checkpointfolder, STATE_FILE) if self.checkpointfolder else None
        if not path or not os.path.exists(path):
            return
        state = torch.load(path, weights_only=False)
        if state["signature"] != self.signature():
            differs = sorted(k for k in self.signature() if state["signature"].get(k) != self.signature()[k])
            raise CompressionError(f"{path} holds a different search (its {', '.join(differs)} differ); use another "
                                   "checkpointfolder or delete the file to start afresh")
        self.history = [Episode(**entry) for entry in state["history"]]
        self.best = max(self.history, key=lambda e: e.reward, default=None)
        self.elapsed = state["elapsed"]
        self.load_agent_state(state["agent"])

    # ------------------------------------------------------------------ the search
    def search(self) -> SearchResult:
        """Run (or resume) the search and return the :class:`SearchResult` at the best policy."""
        if self.checkpointfolder:
            self._resume()
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(self.checkpointfolder, "tensorboard"))
        self._bar = tqdm(total=self.episodes, initial=len(self.history), desc=f"{self.name} search",
                         disable=not self.verbose)
        self._started = time.perf_counter()
        try:
            if len(self.history) < self.episodes:
                self.run_agent()
        finally:
            self.elapsed += self._running()
            self._started = None
            self._bar.close()
            if self._writer is not None:
                self._writer.close()
        return self.result()

    def result(self) -> SearchResult:
        """The result at the best episode so far: the compressed network (BatchNorms re-estimated as during the
        search), its counted MACs and held-out accuracy. Written to ``checkpointfolder`` when there is one."""
        if self.best is None:
            raise CompressionError("no episode has run yet")
        keeps = self.best.keeps
        network = self.action.compress(keeps)
        accuracy = self.evaluator.accuracy(self.action.first_changed(keeps), network,
                                           self.action.unchanged_until(keeps))
        macs = count_flops(network).total_macs
        names = [unit.name for unit in self.units]
        result = SearchResult(
            ratios=dict(zip(names, self.best.ratios)), keeps=dict(zip(names, keeps)), compressed_net=network,
            macs=macs, macs_ratio=macs / max(count_flops(self.rnet).total_macs, 1), accuracy=accuracy,
            original_accuracy=self.original_accuracy, history=list(self.history), best=self.best,
            evaluations=self.scorer.evaluations, seconds=self.elapsed, budget=self.budget_kind,
            cost_ratio=self.best.cost_ratio)
        if self.checkpointfolder:
            self.write_result(result)
        return result

    def write_result(self, result: SearchResult) -> None:
        """Save the compressed network (``compressed.pkl``) and the summary (``search_result.json``) atomically."""
        result.compressed_net.save(pkl=os.path.join(self.checkpointfolder, "compressed.pkl"))
        with atomic_path(os.path.join(self.checkpointfolder, RESULT_FILE)) as temporary:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(result.to_dict(), handle, indent=2)

    def uniform_keeps(self) -> list[int]:
        """The uniform policy at the budget: one preserve ratio for every unit, the largest (by bisection) whose
        rounded counts fit the budget; the baseline a search must beat."""
        low, high = 0.0, 1.0
        for _ in range(40):
            middle = (low + high) / 2
            keeps = [unit.keep_for(max(middle, unit.lowest / unit.size)) for unit in self.units]
            if self.model.cost(np.array(keeps)) <= self.wall.budget * (1 + 1e-9):
                low = middle
            else:
                high = middle
        return [unit.keep_for(max(low, unit.lowest / unit.size)) for unit in self.units]
