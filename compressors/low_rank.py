"""Low-rank decomposition of every Linear and convolution of a captured network (the AMC wiki's
``LowRankDecompostion``): each chosen layer becomes two, a k×k conv to ``r`` channels then a 1×1 conv back (see
:mod:`compressors.low_rank_layers`), with factors from the weights (truncated SVD) or from data (Zhang, Zou, He,
Sun, TPAMI 2016; see :mod:`compressors.low_rank_solvers`).

Layers are decomposed one at a time in graph order. With ``method="data"``, each layer's factors reconstruct the
*original* network's responses from those of the layer fed by the *already decomposed* network (asymmetric, so
errors do not accumulate), in the space of the BatchNorm that follows it; ``nonlinear_case=True`` reconstructs
them after the following ReLU where there is one. Ranks come from ``compress_ratio`` (the fraction of each layer's
multiply-adds to remove; a number or a dict by node name), from a whole-network ``flops_target`` (the fraction of
the network's MACs to keep; ranks allocated across layers by the response energy each rank keeps), or explicitly
from ``ranks``. The result is an ordinary :class:`~graph.network.ReconstructedNetwork`: its rank channels form new
channel groups that can be pruned, and it counts, saves, draws and exports like any other.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from graph.flops import count_flops
from graph.network import ReconstructedNetwork
from graph.rewrite import NewNode, replace_node

from .base import CompressionError, Compressor, Ratio, check_ratio, recalibrate_batchnorm
from .features import collect_response_statistics
from .low_rank_layers import Candidate, Followers, candidates, followers
from .low_rank_solvers import (Factors, Moments, RankCurve, allocate_ranks, data_factors, nonlinear_factors,
                               response_energy, weight_energy, weight_svd_factors)

METHODS = ("weight", "data")


@dataclass
class LayerProblem:
    """One layer's decomposition problem, solvable at any rank: ``solve(rank)`` returns its :class:`Factors`
    (statistics are collected once, ranks tried as often as ``accuracy_first`` needs)."""

    candidate: Candidate
    followers: Followers
    solve: Callable[[int], Factors]
    nonlinear: bool


class LowRankDecomposition(Compressor):
    """Split Linear and convolution layers into two low-rank layers; ``compress()`` leaves the result in
    ``compressed_net``.

    Arguments as in the AMC wiki: ``origin_net`` (an ``nn.Module``, captured from the first training batch, or a
    ``ReconstructedNetwork``), ``trainloader`` (calibration data; ``trainset_ratio`` of its batches are used, at
    ``sampled_pixels_per_img`` random output positions per image), ``valloader`` (accuracy for ``accuracy_first``
    and for choosing BatchNorm recalibration), ``compress_ratio`` (fraction of each layer's MACs to remove: a number
    or ``{node name: ratio}``), ``checkpointfolder``, ``device``, ``verbose``, ``drawgraph``, ``accuracy_first``
    with ``accuracy_threshold`` (the lowest validation top-1 accuracy, in [0, 1], a decomposed layer may leave:
    below it the layer's rank is doubled until it is met, else the layer stays as it was), ``args`` (kept for the
    caller), ``nonlinear_case`` (reconstruct the responses after the following ReLU).

    Beyond the wiki: ``flops_target`` (keep this fraction of the whole network's MACs, ranks allocated across
    layers; instead of ``compress_ratio``), ``method`` (``"data"``, the default: data-driven; ``"weight"``:
    truncated SVD of the weights, no data needed beyond capture), ``ranks`` (``{node name: rank per group}``,
    overriding the others for those nodes), ``recalibrate_bn`` (re-estimate BatchNorm statistics afterwards,
    kept only when it does not lower validation accuracy; without a valloader only for ``method="weight"``),
    ``max_rows`` (sampled rows kept per layer for the nonlinear solver), ``nonlinear_iterations``, ``seed``.
    """

    name = "low-rank"

    def __init__(self, origin_net: nn.Module, trainloader: DataLoader | None = None,
                 valloader: DataLoader | None = None, trainset_ratio: float = 1.0, sampled_pixels_per_img: int = 10,
                 compress_ratio: Ratio | None = None, checkpointfolder: str | None = None, device: Any = None,
                 verbose: bool = False, drawgraph: bool = False, accuracy_first: bool = False,
                 accuracy_threshold: float = 0.0, args: Any = None, nonlinear_case: bool = False, *,
                 flops_target: float | None = None, method: str = "data", ranks: Mapping[str, int] | None = None,
                 recalibrate_bn: bool = True, max_rows: int = 20000, nonlinear_iterations: int = 25,
                 seed: int = 0):
        if method not in METHODS:
            raise CompressionError(f"method must be one of {METHODS}, got {method!r}")
        if nonlinear_case and method == "weight":
            raise CompressionError("nonlinear_case reconstructs responses from data: use method='data' with it")
        if compress_ratio is not None and flops_target is not None:
            raise CompressionError("give compress_ratio (per layer) or flops_target (whole network), not both")
        if compress_ratio is None and flops_target is None and not ranks:
            raise CompressionError("give compress_ratio (the fraction of each layer's MACs to remove), "
                                   "flops_target (the fraction of the network's MACs to keep) or ranks")
        if isinstance(sampled_pixels_per_img, bool) or not isinstance(sampled_pixels_per_img, int) \
                or sampled_pixels_per_img < 1:
            raise CompressionError(f"sampled_pixels_per_img must be a positive integer, got {sampled_pixels_per_img!r}")
        if accuracy_first and not 0 <= accuracy_threshold <= 1:
            raise CompressionError(f"accuracy_threshold is a top-1 accuracy in [0, 1], got {accuracy_threshold}")
        for label, value in (("max_rows", max_rows), ("nonlinear_iterations", nonlinear_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CompressionError(f"{label} must be a positive integer, got {value!r}")
        super().__init__(origin_net, trainloader, valloader, trainset_ratio, checkpointfolder, device, verbose,
                         drawgraph, accuracy_first, accuracy_threshold, args)
        self.sampled_pixels_per_img = sampled_pixels_per_img
        self.compress_ratio = compress_ratio
        self.flops_target = None if flops_target is None else check_ratio("flops_target", flops_target)
        self.method, self.nonlinear_case = method, bool(nonlinear_case)
        self.ranks = dict(ranks or {})
        self.recalibrate_bn = recalibrate_bn
        self.max_rows, self.nonlinear_iterations, self.seed = max_rows, nonlinear_iterations, seed
        self.macs = {row.name: row.macs or 0 for row in count_flops(self.origin_net).rows}
        self.candidates = {c.name: c for c in candidates(self.origin_net, self.macs)}
        self._check_ranks()
        if compress_ratio is not None:
            self.resolve_ratios(compress_ratio, list(self.candidates))

    def _check_ranks(self) -> None:
        for name, rank in self.ranks.items():
            candidate = self.candidates.get(name)
            if candidate is None:
                raise CompressionError(f"ranks names {name!r}, which is not a decomposable node of this network "
                                       f"(decomposable: {', '.join(list(self.candidates)[:8])}"
                                       f"{' ...' if len(self.candidates) > 8 else ''})")
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= candidate.full_rank:
                raise CompressionError(f"ranks[{name!r}] must be an integer in [1, {candidate.full_rank}] (per group), "
                                       f"got {rank!r}")

    # ------------------------------------------------------------------ ranks
    def plan_ranks(self) -> dict[str, int]:
        """Rank per group for every decomposable node (0: left as it is), from ``ranks``, ``compress_ratio`` or
        ``flops_target``."""
        if self.flops_target is not None:
            plan = self._allocate()
        elif self.compress_ratio is not None:
            ratios = self.resolve_ratios(self.compress_ratio, list(self.candidates))
            plan = {name: self.candidates[name].rank_for_ratio(ratio) for name, ratio in ratios.items()}
        else:
            plan = {}
        plan.update(self.ranks)
        return {name: plan.get(name, 0) for name in self.candidates}

    def _allocate(self) -> dict[str, int]:
        """Ranks under the whole-network budget (see :func:`allocate_ranks`), from the original network's weight
        or response energy."""
        total = sum(self.macs.values())
        fixed = total - sum(c.macs for c in self.candidates.values()) + sum(
            rank * self.candidates[name].macs_per_rank for name, rank in self.ranks.items())
        budget = self.flops_target * total - fixed
        energies = self._energies([name for name in self.candidates if name not in self.ranks])
        curves = {name: RankCurve(energy, c.macs, c.macs_per_rank, c.max_rank)
                  for name, energy in energies.items() for c in [self.candidates[name]]}
        try:
            return allocate_ranks(curves, budget)
        except ValueError as error:
            raise CompressionError(f"flops_target={self.flops_target} cannot be met by low-rank decomposition: "
                                   f"{error}") from None

    def _energies(self, names: list[str]) -> dict[str, Any]:
        """Per-node energy spectra (groups × rank): squared singular values of the weights, or eigenvalues of the
        original responses' covariance (one calibration pass for all layers)."""
        net = self.origin_net
        spaces = {name: followers(net, name, self.candidates[name].out_channels).space for name in names}
        if self.method == "weight":
            return {name: weight_energy(self._weight(net, name), self.candidates[name].groups, spaces[name])
                    for name in names}
        stats = collect_response_statistics(net, names, self.calibration_batches("low-rank: response energy"),
                                            samples_per_example=self.sampled_pixels_per_img, seed=self.seed)
        return {name: response_energy(Moments.from_statistics(stats[name], spaces[name]),
                                      self.candidates[name].groups) for name in names}

    def _weight(self, network: ReconstructedNetwork, name: str) -> torch.Tensor:
        """Node ``name``'s weight as (n × fan-in per group), on the CPU."""
        return self.candidates[name].kind.weight_matrix(network.module_of(network.node(name))).cpu()

    # ------------------------------------------------------------------ one layer
    def problem(self, working: ReconstructedNetwork, name: str) -> LayerProblem:
        """The decomposition problem of node ``name`` in ``working`` (where it is still the original layer, fed
        by the layers decomposed so far)."""
        candidate = self.candidates[name]
        module = working.module_of(working.node(name))
        weight = self._weight(working, name)
        bias = None if module.bias is None else module.bias.detach().cpu()
        follow = followers(working, name, candidate.out_channels)
        groups = candidate.groups
        if self.method == "weight":
            return LayerProblem(candidate, follow, lambda rank: weight_svd_factors(weight, groups, rank, follow.space,
                                                                                   bias), False)
        nonlinear = self.nonlinear_case and follow.relu
        stats = collect_response_statistics(working, [name], self.calibration_batches(f"low-rank: {name}"),
                                            reference=self.origin_net,
                                            samples_per_example=self.sampled_pixels_per_img,
                                            keep_rows=self.max_rows if nonlinear else 0, seed=self.seed)[name]
        moments = Moments.from_statistics(stats, follow.space)
        if nonlinear:
            rows = stats.kept_rows()
            return LayerProblem(candidate, follow, lambda rank: nonlinear_factors(
                weight, bias, groups, rank, follow.space, moments, *rows, self.nonlinear_iterations), True)
        return LayerProblem(candidate, follow, lambda rank: data_factors(weight, bias, groups, rank, follow.space,
                                                                         moments), False)

    def decompose(self, working: ReconstructedNetwork, problem: LayerProblem,
                  rank: int) -> tuple[ReconstructedNetwork, Factors]:
        """A copy of ``working`` with the problem's layer replaced by its rank-``rank`` factors (nodes
        ``NAME.reduce`` and ``NAME.expand``), and the factors."""
        candidate = problem.candidate
        module = working.module_of(working.node(candidate.name))
        factors = problem.solve(rank)
        first, second = candidate.kind.build(module, factors, rank)
        return replace_node(working, candidate.name, [NewNode(f"{candidate.name}.reduce", first),
                                                      NewNode(f"{candidate.name}.expand", second)]), factors

    # ------------------------------------------------------------------ the pipeline
    def collect_solve_rewrite(self) -> ReconstructedNetwork:
        """Decompose the planned layers in graph order (see the module docstring), then recalibrate BatchNorm
        where that helps; every layer's choice is logged."""
        plan = {name: rank for name, rank in self.plan_ranks().items() if rank > 0}
        working = self.origin_net
        for name, rank in tqdm(plan.items(), desc="low-rank: layers", disable=not self.verbose):
            problem = self.problem(working, name)
            working = self._decompose_checked(working, problem, rank)
        if working is self.origin_net:
            working = copy.deepcopy(working)
        return self._recalibrated(working)

    def _decompose_checked(self, working: ReconstructedNetwork, problem: LayerProblem,
                           rank: int) -> ReconstructedNetwork:
        """Decompose at ``rank``; with ``accuracy_first``, double the rank while validation accuracy is below the
        threshold and leave the layer as it is when even the largest saving rank is not enough."""
        candidate = problem.candidate
        accuracy = None
        while True:
            result, factors = self.decompose(working, problem, rank)
            if not self.accuracy_first:
                break
            accuracy = self.evaluate(result)
            if accuracy >= self.accuracy_threshold:
                break
            if rank >= candidate.max_rank:
                self.record(node=candidate.name, rank=0, kept="original", accuracy=accuracy,
                            reason=f"accuracy {accuracy:.4f} < threshold {self.accuracy_threshold} at every rank")
                return working
            rank = min(2 * rank, candidate.max_rank)
        macs_after = rank * candidate.macs_per_rank
        self.record(node=candidate.name, rank=rank, channels=rank * candidate.groups, groups=candidate.groups,
                    macs_before=int(candidate.macs), macs_after=int(round(macs_after)),
                    removed=round(1 - macs_after / candidate.macs, 4), method=self.method,
                    nonlinear=problem.nonlinear, responses=problem.followers.response_node,
                    relative_error=round(factors.error, 6),
                    **({"accuracy": accuracy} if accuracy is not None else {}))
        return result

    def _recalibrated(self, network: ReconstructedNetwork) -> ReconstructedNetwork:
        """``network`` with BatchNorm statistics re-estimated on the calibration data, when ``recalibrate_bn`` and
        it does not lower validation accuracy (without a valloader: only for ``method="weight"``)."""
        has_norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules())
        if not self.recalibrate_bn or not has_norms or (self.valloader is None and self.method != "weight"):
            return network
        recalibrated = copy.deepcopy(network)
        recalibrate_batchnorm(recalibrated, self.calibration_batches("low-rank: BatchNorm"), self.device)
        if self.valloader is None:
            self.record(step="recalibrate_bn", kept=True)
            return recalibrated
        before, after = self.evaluate(network), self.evaluate(recalibrated)
        self.record(step="recalibrate_bn", accuracy_before=before, accuracy_after=after, kept=after >= before)
        return recalibrated if after >= before else network


LowRankDecompostion = LowRankDecomposition
