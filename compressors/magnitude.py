"""Magnitude pruning: the ``torch.nn.utils.prune`` feature set on captured networks, with no index bookkeeping.

``MagnitudePruning(origin_net, trainloader, valloader, sparsity=..., scope=..., method=...)`` zeroes weights of every
conv and linear node (or the nodes ``sparsity`` names): local (per layer) or global (one threshold over all of them);
``l1``, ``random``, ``ln_structured`` (whole rows or channels), ``2:4`` or a custom score function. Masks are kept
beside the weights with ``torch.nn.utils.prune``'s re-parametrisation (``weight = weight_orig * weight_mask``), so
fine-tuning keeps pruned weights at zero and their gradients are zero; :meth:`MagnitudePruning.make_permanent` is
the seed's ``prune.remove`` and leaves a plain network. With ``physical=True``, ``ln_structured`` at ``dim=0``
removes the rows (output channels, neurons) and every coupled column of the next layers through the dependency
groups, so the network becomes smaller, not just sparser.
"""
from __future__ import annotations

import copy
import fnmatch
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from graph.network import ReconstructedNetwork
from graph.pruning import prune_channels

from .base import CompressionError, Compressor
from .masks import MASK_METHODS, UNSTRUCTURED, ScoreFunction, keep_top, score_mask

SCOPES = ("local", "global")


def weight_nodes(network: ReconstructedNetwork) -> dict[str, nn.Module]:
    """The nodes whose module holds a ``weight`` of rank >= 2 (convolutions, linear layers), by node name; a module
    called several times is listed once, under its first node."""
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for node in network.layer_nodes:
        module = network.nodes[node.key] if node.key else None
        weight = getattr(module, "weight_orig", None) if module is not None else None
        weight = weight if weight is not None else getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and id(module) not in seen:
            seen.add(id(module))
            found[node.name] = module
    return found


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the module computes with (``weight_orig * weight_mask`` while a mask is attached)."""
    if torch_prune.is_pruned(module) and hasattr(module, "weight_mask"):
        return (module.weight_orig * module.weight_mask).detach()
    return module.weight.detach()


def attach_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Replace any mask on ``module.weight`` by ``mask`` (previously pruned entries are folded in first, so a new
    mask computed from the effective weights keeps them pruned)."""
    if hasattr(module, "weight_mask"):
        torch_prune.remove(module, "weight")
    torch_prune.custom_from_mask(module, "weight", mask.to(module.weight.device))


class MagnitudePruning(Compressor):
    """Zero (or, structured with ``physical=True``, remove) the lowest-magnitude weights of a captured network.

    ``sparsity``: the fraction of weights to zero, one number or a dict by node name (``fnmatch`` patterns such as
    ``"features.*"`` allowed; the first matching key wins; unnamed nodes are left dense). ``scope``: ``"local"`` (each
    layer to its own sparsity) or ``"global"`` (one magnitude threshold across all layers; needs one number and an
    unstructured method). ``method``: ``"l1"``, ``"random"``, ``"ln_structured"`` (``n``-norm over slices along
    ``dim``), ``"2:4"`` or a callable ``score(weight) -> tensor`` (higher keeps).
    """

    name = "magnitude"

    def __init__(self, origin_net: nn.Module, trainloader=None, valloader=None,
                 sparsity: float | Mapping[str, float] = 0.5, scope: str = "local", method: str | ScoreFunction = "l1",
                 n: float = 2, dim: int = 0, physical: bool = False, seed: int = 0, **kwargs: Any):
        super().__init__(origin_net, trainloader, valloader, **kwargs)
        if scope not in SCOPES:
            raise CompressionError(f"scope must be one of {SCOPES}, got {scope!r}")
        if not callable(method) and method not in MASK_METHODS:
            raise CompressionError(f"unknown method {method!r}; use one of {sorted(MASK_METHODS)} or a callable "
                                   "score(weight) -> tensor")
        if scope == "global" and (isinstance(sparsity, Mapping) or not (callable(method) or method in UNSTRUCTURED)):
            raise CompressionError("global scope ranks single weights across layers: give one sparsity number and "
                                   f"an unstructured method ({sorted(UNSTRUCTURED)} or a callable)")
        if physical and method != "ln_structured":
            raise CompressionError("physical=True removes whole rows and needs method='ln_structured'")
        self.sparsity, self.scope, self.method = sparsity, scope, method
        self.n, self.dim, self.physical, self.seed = n, dim, physical, seed
        self.targets = self.layer_sparsities(self.origin_net, sparsity)

    # ------------------------------------------------------------------ what to prune
    def layer_sparsities(self, network: ReconstructedNetwork, sparsity: float | Mapping[str, float]) -> dict[str, float]:
        """Sparsity per weight node of ``network``: the number for all, or the first matching key of the dict."""
        nodes = list(weight_nodes(network))
        if not isinstance(sparsity, Mapping):
            return {name: _check_sparsity("sparsity", sparsity) for name in nodes}
        chosen: dict[str, float] = {}
        for pattern, value in sparsity.items():
            matched = [name for name in nodes if fnmatch.fnmatchcase(name, pattern)]
            if not matched:
                raise CompressionError(f"sparsity names {pattern!r}, which matches no conv or linear node of this "
                                       f"network (nodes: {', '.join(nodes[:8])}{' ...' if len(nodes) > 8 else ''})")
            for name in matched:
                chosen.setdefault(name, _check_sparsity(f"sparsity[{pattern!r}]", value))
        return chosen

    # ------------------------------------------------------------------ the compressor
    def collect_solve_rewrite(self) -> ReconstructedNetwork:
        """Copy the original, then mask (or, with ``physical``, remove) its weights at the asked sparsities."""
        network = copy.deepcopy(self.origin_net)
        if self.physical:
            return self.remove_rows(network, self.targets)
        self.apply_masks(network, self.targets)
        return network

    def apply_masks(self, network: ReconstructedNetwork, sparsities: Mapping[str, float]) -> None:
        """Mask ``network``'s weights in place to ``sparsities`` (by node name), computed from the current effective
        weights, so masks only grow when sparsities rise (the gradual schedules call this)."""
        modules = weight_nodes(network)
        generator = torch.Generator().manual_seed(self.seed)
        method = score_mask(self.method) if callable(self.method) else MASK_METHODS[self.method]
        if self.scope == "global":
            masks = self._global_masks({name: modules[name] for name in sparsities},
                                       max(sparsities.values(), default=0.0), generator)
        else:
            masks = {name: _node_mask(method, name, effective_weight(modules[name]), value, n=self.n, dim=self.dim,
                                      generator=generator) for name, value in sparsities.items()}
        for name, mask in masks.items():
            attach_mask(modules[name], mask)
            self.record(node=name, sparsity=round(1 - mask.float().mean().item(), 6), weights=mask.numel())

    def _global_masks(self, modules: dict[str, nn.Module], sparsity: float,
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
        weights = {name: effective_weight(module) for name, module in modules.items()}
        if callable(self.method):
            scores = {name: self.method(weight) for name, weight in weights.items()}
        elif self.method == "random":
            scores = {name: torch.rand(weight.shape, generator=generator) for name, weight in weights.items()}
        else:
            scores = {name: weight.abs() for name, weight in weights.items()}
        pooled = torch.cat([s.reshape(-1).float() for s in scores.values()])
        keep = keep_top(pooled, sparsity)
        masks, start = {}, 0
        for name, weight in weights.items():
            masks[name] = keep[start:start + weight.numel()].reshape(weight.shape)
            start += weight.numel()
        return masks

    def remove_rows(self, network: ReconstructedNetwork, sparsities: Mapping[str, float]) -> ReconstructedNetwork:
        """Physically remove the ``sparsity`` fraction of each node's rows of smallest L``n`` norm, with every tensor
        coupled to them (the next layer's columns, norms, residual partners) through the dependency groups."""
        if self.dim != 0:
            raise CompressionError("physical structured pruning removes rows (output channels): use dim=0")
        groups = network.channel_groups()
        scores: dict[Any, np.ndarray] = {}
        fractions: dict[Any, float] = {}
        for name, sparsity in sparsities.items():
            group = _producer_group(groups, name)
            if group is None or not group.prunable or group.explicit_only:
                self.record(node=name, removed=0, reason=getattr(group, "reason", None) or "no prunable output group")
                continue
            member = next(m for m in group.members if m.node == name and m.tensor == "weight" and m.dim == 0)
            weight = effective_weight(network.nodes[network.node(name).key])
            norms = torch.linalg.vector_norm(weight.float(), ord=self.n, dim=list(range(1, weight.dim())))
            per_channel = norms.numpy()[member.positions].sum(axis=1)
            scores[group] = scores.get(group, 0) + per_channel / (per_channel.mean() or 1.0)
            fractions[group] = max(fractions.get(group, 0.0), sparsity)
        plan = {}
        for group, score in scores.items():
            count = min(group.size - 1, int(round(fractions[group] * group.size)))
            if count > 0:
                plan[group] = np.argsort(score, kind="stable")[:count].tolist()
                self.record(group=group.id, nodes=group.nodes[:4], removed=count, kept=group.size - count)
        return prune_channels(network, plan) if plan else network

    def make_permanent(self, network: ReconstructedNetwork | None = None) -> ReconstructedNetwork:
        """Fold every mask into its weight and drop the re-parametrisation (``torch.nn.utils.prune.remove``), in
        place; returns the plain network (``compressed_net`` by default), which saves like any other."""
        network = network if network is not None else self.compressed_net
        if network is None:
            raise CompressionError("nothing to make permanent: call compress() first")
        for module in network.modules():
            if hasattr(module, "weight_mask") and torch_prune.is_pruned(module):
                torch_prune.remove(module, "weight")
        network.recompile()
        return network


def _node_mask(method, name: str, weight: torch.Tensor, sparsity: float, **options: Any) -> torch.Tensor:
    """``method``'s mask for node ``name``; a method's refusal is re-raised naming the node."""
    try:
        return method(weight, sparsity, **options)
    except ValueError as error:
        raise CompressionError(f"node {name}: {error} (leave it out by naming the nodes in a sparsity dict)") from None


def _producer_group(groups: list, name: str):
    """The channel group holding node ``name``'s output rows (its weight's dim 0)."""
    for group in groups:
        if any(m.node == name and m.tensor == "weight" and m.dim == 0 and m.role == "out" for m in group.members):
            return group
    return None


def _check_sparsity(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise CompressionError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)
