"""Accuracy-first search (the AMC wiki's ``accuracy_first``): the smallest MACs budget whose searched policy keeps
the held-out accuracy within ``accuracy_threshold`` of the original, found by bisection over the budget, one full
search per budget tried."""
from __future__ import annotations

import os
from typing import Any

from compressors.base import CompressionError

from .search import SearchResult, SearchTuner


def accuracy_first_search(tuner_class: type[SearchTuner], origin_net, trainloader, valloader,
                          accuracy_threshold: float, low: float = 0.05, high: float = 0.95, steps: int = 4,
                          checkpointfolder: str | os.PathLike | None = None, **options: Any) -> SearchResult:
    """Bisect ``flops_target`` in ``[low, high]`` for ``steps`` searches with ``tuner_class`` (other arguments as
    for the tuner); return the result of the smallest target whose held-out accuracy is at least the original's
    minus ``accuracy_threshold``. Each search checkpoints into ``checkpointfolder/target_<t>`` when a folder is
    given. :class:`CompressionError` when even ``high`` loses more than the threshold."""
    if not 0 <= accuracy_threshold < 1:
        raise CompressionError(f"accuracy_threshold must be in [0, 1), got {accuracy_threshold!r}")
    if not 0 < low < high < 1:
        raise CompressionError(f"need 0 < low < high < 1, got {low} and {high}")
    best: SearchResult | None = None
    tried: list[tuple[float, float]] = []

    def search(target: float) -> SearchResult:
        folder = os.path.join(checkpointfolder, f"target_{target:.4f}") if checkpointfolder else None
        result = tuner_class(origin_net, trainloader, valloader, flops_target=target, checkpointfolder=folder,
                             **options).search()
        tried.append((target, result.accuracy))
        return result

    def good(result: SearchResult) -> bool:
        return result.accuracy >= result.original_accuracy - accuracy_threshold

    first = search(high)
    if not good(first):
        raise CompressionError(f"even {high:.0%} of the MACs loses more than {accuracy_threshold} held-out accuracy "
                               f"({first.original_accuracy:.4f} -> {first.accuracy:.4f}); raise the threshold or "
                               "fine-tune between steps (compressors.tuners.iterate)")
    best = first
    for _ in range(steps - 1):
        target = (low + high) / 2
        result = search(target)
        if good(result):
            best, high = result, target
        else:
            low = target
    best.extra["accuracy_first"] = {"threshold": accuracy_threshold, "tried": tried}
    return best
