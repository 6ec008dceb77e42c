"""Keep-masks for unstructured and semi-structured magnitude pruning: one small function per method.

Each method maps a weight tensor and a sparsity (the fraction of entries to zero) to a boolean keep-mask of the same
shape. ``MASK_METHODS`` is the registry ``MagnitudePruning(method=...)`` looks names up in; a callable method is a
score function (higher = keep) whose scores are ranked like magnitudes.
"""
from __future__ import annotations

from typing import Callable

import torch

MaskMethod = Callable[..., torch.Tensor]
ScoreFunction = Callable[[torch.Tensor], torch.Tensor]


def keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of the ``round((1 - sparsity) * n)`` highest scores (ties broken by position, stable)."""
    count = scores.numel() - int(round(sparsity * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        order = torch.argsort(scores.reshape(-1).float(), descending=True, stable=True)
        mask[order[:count]] = True
    return mask.reshape(scores.shape)


def l1_mask(weight: torch.Tensor, sparsity: float, **_: object) -> torch.Tensor:
    """Zero the entries of smallest magnitude (``torch.nn.utils.prune.l1_unstructured``'s rule)."""
    return keep_top(weight.detach().abs(), sparsity)


def random_mask(weight: torch.Tensor, sparsity: float, generator: torch.Generator | None = None,
                **_: object) -> torch.Tensor:
    """Zero a uniformly random subset of the entries (exactly ``round(sparsity * n)`` of them)."""
    scores = torch.rand(weight.shape, generator=generator)
    return keep_top(scores, sparsity).to(weight.device)


def ln_structured_mask(weight: torch.Tensor, sparsity: float, n: float = 2, dim: int = 0,
                       **_: object) -> torch.Tensor:
    """Zero whole slices along ``dim`` (rows of a Linear, output channels of a conv at ``dim=0``) of smallest
    L``n`` norm, as ``torch.nn.utils.prune.ln_structured`` does."""
    if weight.dim() < 2:
        raise ValueError(f"ln_structured needs a weight of rank >= 2, got shape {tuple(weight.shape)}")
    dim %= weight.dim()
    others = [d for d in range(weight.dim()) if d != dim]
    norms = torch.linalg.vector_norm(weight.detach().float(), ord=n, dim=others)
    keep = keep_top(norms, sparsity)
    shape = [1] * weight.dim()
    shape[dim] = -1
    return keep.reshape(shape).expand_as(weight).clone()


def semi_structured_mask(weight: torch.Tensor, sparsity: float = 0.5, keep: int = 2, block: int = 4,
                         **_: object) -> torch.Tensor:
    """N:M semi-structured mask (2:4 by default, what sparse tensor cores use): in every run of ``block``
    consecutive weights along the input dim (dim 1, flattened with the kernel), keep the ``keep`` largest.
    ``sparsity`` must be ``1 - keep / block``."""
    if abs(sparsity - (1 - keep / block)) > 1e-9:
        raise ValueError(f"a {keep}:{block} mask has sparsity {1 - keep / block:g}; got sparsity {sparsity:g}")
    rows = weight.detach().abs().reshape(weight.shape[0], -1)
    if rows.shape[1] % block:
        raise ValueError(f"a {keep}:{block} mask needs the input size ({rows.shape[1]}) to be a multiple of "
                         f"{block}")
    blocks = rows.reshape(rows.shape[0], -1, block)
    top = blocks.topk(keep, dim=-1).indices
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(weight.shape)


def score_mask(score: ScoreFunction) -> MaskMethod:
    """A mask method that keeps the highest entries of ``score(weight)`` (a user's custom importance)."""

    def method(weight: torch.Tensor, sparsity: float, **_: object) -> torch.Tensor:
        scores = score(weight.detach())
        if not isinstance(scores, torch.Tensor) or scores.shape != weight.shape:
            raise ValueError(f"a custom importance must return a tensor of the weight's shape {tuple(weight.shape)}, "
                             f"got {getattr(scores, 'shape', type(scores).__name__)}")
        return keep_top(scores, sparsity)

    return method


MASK_METHODS: dict[str, MaskMethod] = {
    "l1": l1_mask,
    "random": random_mask,
    "ln_structured": ln_structured_mask,
    "2:4": semi_structured_mask,
}
UNSTRUCTURED = {"l1", "random"}
