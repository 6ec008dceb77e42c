"""Channel pruning by LASSO selection and least-squares reconstruction (He, Zhang, Sun, ICCV 2017), on any graph the
dependency analysis handles.

The unit removed is a channel group (:meth:`ReconstructedNetwork.channel_groups`): channels that must go together
through residual adds, concatenations, UNet skips or attention heads. Groups are processed in topological order.
For each, the layers that read its channels (its *consumers*: convolutions and Linear layers) are sampled on
calibration data, inputs ``X`` from the network compressed so far and targets ``Y`` from the original, so errors do
not accumulate (:func:`compressors.features.collect_layer_statistics`). One LASSO over the per-channel contributions
to **every** consumer's output picks the channels to keep (:func:`select_channels`, scikit-learn's
``lars_path_gram`` on the small channels×channels Gram matrix: the exact count is read off the path), then each
consumer's kept weights (and bias) are refitted by least squares (:func:`least_squares_refit`). See
``docs/channel_pruning.md`` for how the joint LASSO generalises the paper's multi-branch handling.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from sklearn.linear_model import lars_path_gram
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from graph.dependency import ChannelGroup
from graph.importance import group_importance
from graph.modules import FunctionalOp, ParameterNode
from graph.network import ReconstructedNetwork
from graph.pruning import dependency_graph, mask_channels, multiply_adds, plan_for_flops, prune_channels
from graph.write_back import write_back

from .base import CompressionError, Compressor, Ratio, check_ratio, recalibrate_batchnorm
from .features import LayerStatistics, collect_layer_statistics, row_extractor


# ---------------------------------------------------------------------------------------------------- the solvers
def select_channels(gram: np.ndarray, correlation: np.ndarray, keep: int, n_samples: int = 1) -> np.ndarray:
    """Indices (sorted) of the ``keep`` channels a LASSO picks to reconstruct a target from per-channel
    contributions ``z_i``: ``gram[i, j] = <z_i, z_j>``, ``correlation[i] = <z_i, target>``.

    The whole LASSO path (non-negative coefficients, scikit-learn's ``lars_path_gram``) is computed once and the
    first point with exactly ``keep`` non-zero coefficients taken, so no penalty is bisected. Where the path skips
    that count (a variable leaving) the largest coefficients at the next point win; where it ends with fewer
    (channels that contribute nothing), the rest are filled by contribution energy ``gram[i, i]``.
    """
    size = gram.shape[0]
    if not 0 < keep <= size:
        raise CompressionError(f"cannot keep {keep} of {size} channels")
    if keep == size:
        return np.arange(size)
    _, _, coefs = lars_path_gram(Xy=correlation, Gram=gram, n_samples=max(1, n_samples), method="lasso",
                                 positive=True, max_iter=4 * size)
    coefs = np.asarray(coefs).reshape(size, -1)
    counts = (coefs != 0).sum(axis=0)
    reached = np.flatnonzero(counts >= keep)
    beta = np.abs(coefs[:, reached[0]] if reached.size else coefs[:, -1])
    order = np.lexsort((-np.diag(gram), -beta))
    return np.sort(order[:keep])


def least_squares_refit(xtx: torch.Tensor, xty: torch.Tensor, columns: torch.Tensor,
                        ridge: float = 1e-7) -> torch.Tensor:
    """The weights (``len(columns)`` × outputs, i.e. transposed) that best map ``X[:, columns]`` to ``Y`` in the
    least-squares sense, from ``XᵀX`` and ``XᵀY``: ``torch.linalg.lstsq`` on the normal equations, with a ridge of
    ``ridge`` times the mean diagonal, which keeps them full rank (fewer samples than columns, dead channels), so the
    fast blocked QR driver applies."""
    gram = xtx[columns][:, columns]
    scale = float(gram.diagonal().mean()) if gram.numel() else 0.0
    gram = gram + ridge * max(scale, 1e-12) * torch.eye(len(columns), dtype=gram.dtype, device=gram.device)
    driver = "gels" if gram.device.type == "cpu" else None
    return torch.linalg.lstsq(gram, xty[columns], driver=driver).solution


# ---------------------------------------------------------------------------------------------------- consumers
@dataclass
class Consumer:
    """A layer that reads a group's channels and whose output can be reconstructed: ``columns[i]`` are the columns
    of its unfolded input (and of ``weight.reshape(n, -1)``) that group channel ``i`` feeds."""

    node: str
    module: nn.Module
    columns: np.ndarray

    @property
    def width(self) -> int:
        """Columns of the unfolded input (without the bias column)."""
        return self.module.weight[0].numel()

    def transposed_weight(self) -> torch.Tensor:
        """``[W | b]ᵀ`` in float64 (a zero bias row when the layer has none): the solution space of the refit."""
        weight = self.module.weight.detach().reshape(self.module.weight.shape[0], -1)
        bias = self.module.bias.detach() if self.module.bias is not None else weight.new_zeros(weight.shape[0])
        return torch.cat([weight, bias[:, None]], dim=1).double().T

    def write(self, solution: torch.Tensor, columns: torch.Tensor) -> None:
        """Set the weights at ``columns`` (the bias when the last column is included) from ``solution`` and zero
        every other input column."""
        full = torch.zeros(self.width + 1, solution.shape[1], dtype=torch.float64, device=solution.device)
        full[columns] = solution
        weight = self.module.weight
        with torch.no_grad():
            weight.copy_(full[:-1].T.reshape(weight.shape).to(weight.dtype))
            if self.module.bias is not None:
                self.module.bias.copy_(full[-1].to(self.module.bias.dtype))


def group_consumers(network: ReconstructedNetwork, group: ChannelGroup,
                    max_width: int | None = None) -> tuple[list[Consumer], list[str]]:
    """The reconstructable consumers of ``group`` in ``network`` (convolutions with ``groups=1`` and Linear layers
    reading it along their input dim, with at most ``max_width`` unfolded input columns, whose Gram matrix is
    ``max_width²`` doubles), and the names of the other nodes that read it (masked without refit)."""
    consumers, others = [], []
    for member in group.members:
        if member.role != "in":
            continue
        module = network.module_of(network.node(member.node))
        if member.tensor == "weight" and member.dim == 1 and row_extractor(module) is not None \
                and (max_width is None or module.weight[0].numel() <= max_width):
            kernel = module.weight[0, 0].numel()
            columns = (member.positions[:, :, None] * kernel + np.arange(kernel)).reshape(group.size, -1)
            consumers.append(Consumer(member.node, module, columns))
        else:
            others.append(member.node)
    return consumers, list(dict.fromkeys(others))


def _contribution_system(consumer: Consumer, stats: LayerStatistics, active: np.ndarray,
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The LASSO's Gram matrix and correlations for one consumer, normalised by its target energy: ``z_i`` is
    channel ``i``'s contribution ``X[:, cols_i] U[cols_i]`` with the current weights ``U``, the target is ``Y``
    minus the contribution of every other active column (other groups' channels and the bias)."""
    size, per_channel = consumer.columns.shape
    mine = torch.as_tensor(consumer.columns.reshape(-1), device=stats.xtx.device)
    other = torch.as_tensor(np.setdiff1d(active, consumer.columns.reshape(-1)), device=stats.xtx.device)
    weights = consumer.transposed_weight().to(stats.xtx.device)
    own, rest = weights[mine], weights[other]
    block = stats.xtx[mine][:, mine] * (own @ own.T)
    gram = block.reshape(size, per_channel, size, per_channel).sum(dim=(1, 3))
    residual_target = stats.xty[mine] - stats.xtx[mine][:, other] @ rest
    correlation = (own * residual_target).sum(dim=1).reshape(size, per_channel).sum(dim=1)
    scale = max(stats.energy, 1e-30)
    return gram.cpu().numpy() / scale, correlation.cpu().numpy() / scale


# ---------------------------------------------------------------------------------------------------- compressor
class ChannelPruning(Compressor):
    """LASSO channel selection and least-squares reconstruction on every prunable channel group.

    Arguments as in the AMC wiki (see :class:`compressors.base.Compressor` for the shared ones), plus:

    - ``compress_ratio``: the fraction of each compressible layer's multiply-adds to remove, by removing that
      fraction of the channels it reads (its producers lose the same channels); a number for every layer, or a dict
      by consumer node name (other layers are left alone; a group read by several named layers takes the largest);
    - ``flops_target``: instead, the fraction of the whole network's multiply-adds to keep (0.5 = 2x fewer), one
      channel ratio for every group found by bisection (:func:`graph.pruning.plan_for_flops`);
    - ``sampled_pixels_per_img``: output positions sampled per example for each consumer;
    - ``lars_alpha_init``: accepted for the wiki's scripts; the exact channel count is read off the whole LARS path,
      so no initial penalty is needed (it is recorded in the log);
    - ``recalibrate_bn``: re-estimate BatchNorm statistics on the calibration data after pruning;
    - ``max_consumer_width``: consumers with more unfolded input columns than this (a Linear on a large flattened
      feature map) are masked without reconstruction, bounding each Gram matrix to ``max_consumer_width²`` doubles;
    - ``accuracy_first`` / ``accuracy_threshold``: a group whose pruning drops validation accuracy below the
      threshold is pruned half as much, else not at all (the log says which).

    After :meth:`compress`, :attr:`compressed_net` is the pruned ``ReconstructedNetwork``, :attr:`plan` the removed
    channels by group id of :attr:`origin_net`, and :meth:`compressed_model` the user's own model class holding the
    reconstructed weights.
    """

    name = "channel pruning"

    def __init__(self, origin_net: nn.Module, trainloader: DataLoader | None = None,
                 valloader: DataLoader | None = None, trainset_ratio: float = 1.0, sampled_pixels_per_img: int = 10,
                 compress_ratio: Ratio | None = None, checkpointfolder: str | None = None,
                 device: torch.device | str | None = None, verbose: bool = False, drawgraph: bool = False,
                 accuracy_first: bool = False, accuracy_threshold: float = 0.0, args: Any = None,
                 lars_alpha_init: float = 1.0, flops_target: float | None = None, recalibrate_bn: bool = True,
                 max_consumer_width: int = 8192, seed: int = 0):
        if isinstance(sampled_pixels_per_img, bool) or not isinstance(sampled_pixels_per_img, int) \
                or sampled_pixels_per_img < 1:
            raise CompressionError(f"sampled_pixels_per_img must be a positive integer, got {sampled_pixels_per_img!r}")
        if isinstance(lars_alpha_init, bool) or not isinstance(lars_alpha_init, (int, float)) \
                or not math.isfinite(lars_alpha_init) or lars_alpha_init < 0:
            raise CompressionError(f"lars_alpha_init must be a non-negative number, got {lars_alpha_init!r}")
        if (compress_ratio is None) == (flops_target is None):
            raise CompressionError("give exactly one of compress_ratio (per-layer fraction of MACs to remove) and "
                                   "flops_target (fraction of the network's MACs to keep)")
        if flops_target is not None:
            check_ratio("flops_target", flops_target)
        super().__init__(origin_net, trainloader, valloader, trainset_ratio, checkpointfolder, device, verbose,
                         drawgraph, accuracy_first, accuracy_threshold, args)
        self.sampled_pixels_per_img = sampled_pixels_per_img
        self.lars_alpha_init = float(lars_alpha_init)
        self.recalibrate_bn, self.max_consumer_width, self.seed = recalibrate_bn, max_consumer_width, seed
        self.groups = [g for g in dependency_graph(self.origin_net).groups
                       if g.prunable and not g.explicit_only and g.size > 1]
        self.removal = self._removal_counts(compress_ratio, flops_target)
        self.plan: dict[int, list[int]] = {}
        self.reconstructed: ReconstructedNetwork | None = None

    def _removal_counts(self, compress_ratio: Ratio | None, flops_target: float | None) -> dict[int, int]:
        """Channels to remove per group id, from per-layer ratios or the whole-network MACs target."""
        if flops_target is not None:
            return self._counts_for_flops(flops_target)
        readers = {g.id: [m.node for m in g.members if m.role == "in"] for g in self.groups}
        candidates = list(dict.fromkeys(name for names in readers.values() for name in names))
        if not candidates:
            raise CompressionError("this network has no prunable channel group")
        ratios = self.resolve_ratios(compress_ratio, candidates)
        counts = {}
        for group in self.groups:
            named = [ratios[name] for name in readers[group.id] if name in ratios]
            if named:
                counts[group.id] = min(group.size - 1, int(math.floor(group.size * max(named))))
        return {gid: count for gid, count in counts.items() if count > 0}

    def _counts_for_flops(self, flops_target: float, passes: int = 4) -> dict[int, int]:
        """Per-group removal counts for a whole-network MACs target: the uniform channel ratio found by bisection
        (:func:`graph.pruning.plan_for_flops`), then channels given back one at a time, widest groups first, while
        the budget still holds (the uniform ratio's rounding undershoots the target on narrow networks). Only the
        counts matter here, so the trials prune a copy on the meta device, which holds shapes and no data."""
        shapes = copy.deepcopy(self.origin_net).to("meta")
        wanted = {g.id for g in self.groups}
        counts = {g.id: len(indices) for g, indices in plan_for_flops(shapes, flops_target, "random").items()
                  if g.id in wanted and len(indices)}
        budget = multiply_adds(self.origin_net) * flops_target

        def macs(trial: dict[int, int]) -> int:
            return multiply_adds(prune_channels(shapes, {gid: range(n) for gid, n in trial.items()}))

        by_width = sorted(counts, key=lambda gid: -dependency_graph(shapes).groups[gid].size)
        for _ in range(passes):
            changed = False
            for gid in by_width:
                if counts[gid] > 0 and macs({**counts, gid: counts[gid] - 1}) <= budget:
                    counts[gid] -= 1
                    changed = True
            if not changed:
                break
        return {gid: count for gid, count in counts.items() if count > 0}

    # ------------------------------------------------------------------ the pipeline
    def collect_solve_rewrite(self) -> ReconstructedNetwork:
        """Prune the groups one by one on a masked copy of the original (same shapes, removed channels' consumer
        columns zeroed, reconstructed weights written in), then cut the plan out physically and recalibrate."""
        working = copy.deepcopy(self.origin_net)
        removed_columns: dict[str, set[int]] = {}
        baseline = self.evaluate(self.origin_net) if self.accuracy_first else None
        self.plan = {}
        bar = tqdm(self.groups, desc=self.name, disable=not self.verbose)
        for group in bar:
            count = self.removal.get(group.id, 0)
            if count == 0:
                continue
            working = self._prune_group_with_fallback(working, group, count, removed_columns, baseline)
        bar.close()
        self.reconstructed = working
        compressed = prune_channels(working, self.plan)
        if self.recalibrate_bn:
            recalibrate_batchnorm(compressed, self.calibration_batches("BatchNorm recalibration"), self.device)
        compressed.eval()
        self.record(step="summary", macs_before=multiply_adds(self.origin_net), macs_after=multiply_adds(compressed),
                    groups_pruned=len(self.plan), lars_alpha_init=self.lars_alpha_init)
        return compressed

    def _prune_group_with_fallback(self, working: ReconstructedNetwork, group: ChannelGroup, count: int,
                                   removed_columns: dict[str, set[int]], baseline: float | None,
                                   ) -> ReconstructedNetwork:
        """Prune ``count`` channels of ``group``; with ``accuracy_first``, half as many, then none, while the
        validation accuracy falls below the threshold."""
        while count > 0:
            trial_columns = {node: set(cols) for node, cols in removed_columns.items()}
            candidate, removed, entry = self._prune_group(working, group, count, trial_columns)
            if not self.accuracy_first:
                break
            accuracy = self.evaluate(candidate)
            entry.update(val_accuracy=accuracy, baseline_accuracy=baseline)
            if accuracy >= self.accuracy_threshold:
                break
            self.record(**entry, accuracy_first=f"accuracy {accuracy:.4f} < threshold {self.accuracy_threshold}: "
                        "retrying with half as many channels removed")
            count //= 2
        if count == 0:
            self.record(group=group.id, nodes=group.nodes[:4], channels=group.size, removed=0,
                        accuracy_first="left intact: every removal fell below the accuracy threshold")
            return working
        removed_columns.clear()
        removed_columns.update(trial_columns)
        self.plan[group.id] = removed
        self.record(**entry)
        return candidate

    def _prune_group(self, working: ReconstructedNetwork, group: ChannelGroup, count: int,
                     removed_columns: dict[str, set[int]]) -> tuple[ReconstructedNetwork, list[int], dict]:
        """One group: select ``count`` channels to remove (LASSO over every reconstructable consumer, else L2 weight
        norm), mask them in a copy of ``working`` and refit the consumers; returns the copy, the removed indices and
        the log entry. ``removed_columns`` (consumer → removed input columns) is updated."""
        consumers, others = group_consumers(working, group, self.max_consumer_width)
        keep = group.size - count
        entry: dict[str, Any] = dict(group=group.id, nodes=group.nodes[:4], channels=group.size, removed=count,
                                     consumers=[c.node for c in consumers], masked_only=others)
        if not consumers:
            scores = group_importance(working, group, "l2")
            kept = np.sort(np.argsort(-scores, kind="stable")[:keep])
            entry["selection"] = "l2 weight norm (no convolution or Linear of at most max_consumer_width columns " \
                                 "reads this group)"
            removed = np.setdiff1d(np.arange(group.size), kept).tolist()
            return mask_channels(working, {group.id: removed}), removed, entry
        stats = collect_layer_statistics(working, [c.node for c in consumers],
                                         self.calibration_batches(f"group {group.id}"), reference=self.origin_net,
                                         samples_per_example=self.sampled_pixels_per_img, append_ones=True,
                                         seed=self.seed + group.id)
        active = {c.node: self._active_columns(c, removed_columns.get(c.node, set())) for c in consumers}
        gram = np.zeros((group.size, group.size))
        correlation = np.zeros(group.size)
        for consumer in consumers:
            g, r = _contribution_system(consumer, stats[consumer.node], active[consumer.node])
            gram += g
            correlation += r
        kept = select_channels(gram, correlation, keep, n_samples=min(s.count for s in stats.values()))
        removed = np.setdiff1d(np.arange(group.size), kept).tolist()
        candidate = mask_channels(working, {group.id: removed})
        errors_before, errors_after = [], []
        for consumer in consumers:
            gone = consumer.columns[removed].reshape(-1)
            removed_columns.setdefault(consumer.node, set()).update(gone.tolist())
            columns = torch.as_tensor(np.setdiff1d(active[consumer.node], gone), device=stats[consumer.node].xtx.device)
            statistics = stats[consumer.node]
            target = candidate.module_of(candidate.node(consumer.node))
            refit = Consumer(consumer.node, target, consumer.columns)
            errors_before.append(statistics.error(refit.transposed_weight()[columns], columns)
                                 / max(statistics.energy, 1e-30))
            solution = least_squares_refit(statistics.xtx, statistics.xty, columns)
            refit.write(solution, columns)
            errors_after.append(statistics.error(solution, columns) / max(statistics.energy, 1e-30))
        entry.update(selection="lasso", relative_error_masked=[round(e, 6) for e in errors_before],
                     relative_error_refit=[round(e, 6) for e in errors_after])
        return candidate, removed, entry

    @staticmethod
    def _active_columns(consumer: Consumer, removed: set[int]) -> np.ndarray:
        """Columns of the consumer's (bias-augmented) input still in use: not removed, the bias column only when the
        layer has a bias."""
        width = consumer.width + (1 if consumer.module.bias is not None else 0)
        return np.setdiff1d(np.arange(width), np.fromiter(removed, dtype=np.int64, count=len(removed)))

    # ------------------------------------------------------------------ results
    def compressed_model(self) -> nn.Module:
        """The user's own model (a deep copy of the ``nn.Module`` given as ``origin_net``: same class, methods and
        submodule names, a Hugging Face config refitted) with the pruned channels removed and the reconstructed
        weights and recalibrated statistics, through :func:`graph.write_back.write_back`."""
        if self.compressed_net is None:
            raise CompressionError("call compress() first")
        if self.user_module is None:
            raise CompressionError("origin_net was already a ReconstructedNetwork: there is no model class to write "
                                   "back into; use compressed_net")
        model = copy.deepcopy(self.user_module)
        _copy_same_shape_tensors(self.compressed_net, model)
        return write_back(model, self.reconstructed, self.compressed_net)


def _copy_same_shape_tensors(network: ReconstructedNetwork, model: nn.Module) -> None:
    """Copy into ``model`` the values of every tensor of ``network``'s layer and parameter nodes that pruning left
    the same shape (refitted biases, recalibrated BatchNorm statistics): write-back itself only replaces the tensors
    whose shape changed."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for node in network.graph_nodes:
            module = network.nodes[node.key] if node.key else None
            if module is None or isinstance(module, FunctionalOp):
                continue
            items = [(node.name, module.value)] if isinstance(module, ParameterNode) else \
                [(f"{node.name}.{name}", value) for name, value in module.state_dict(keep_vars=True).items()]
            for name, value in items:
                target = tensors.get(name)
                if target is not None and target.shape == value.shape:
                    target.copy_(value)


ChannelPrunning = ChannelPruning

__all__ = ["ChannelPruning", "ChannelPrunning", "select_channels", "least_squares_refit", "group_consumers"]

