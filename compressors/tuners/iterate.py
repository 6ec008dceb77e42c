"""The AMC wiki's iterate loop: compress to a budget with a search, fine-tune the compressed network
(:func:`trainers.finetune`, distilling from the original), take it as the new original and compress again to the
next budget; a few gentle steps lose less accuracy than one big one."""
from __future__ import annotations

import os
from typing import Any, Sequence

from compressors.base import CompressionError, as_network
from graph.flops import count_flops

from .search import SearchResult, SearchTuner, example_inputs


def iterate(tuner_class: type[SearchTuner], origin_net, trainloader, valloader, targets: Sequence[float],
            finetune_epochs: int = 1, finetune_steps: int | None = None, distill: bool = True,
            checkpointfolder: str | os.PathLike | None = None, **options: Any) -> list[SearchResult]:
    """Search to each of ``targets`` (fractions of the *original* MACs, decreasing) in turn, fine-tuning the
    result (``finetune_epochs`` epochs, at most ``finetune_steps`` steps; logit distillation from the original
    when ``distill``) before the next search. Returns one result per step; the last one's ``compressed_net`` is
    the final network (fine-tuned). Steps checkpoint into ``checkpointfolder/step_<i>``."""
    from trainers import finetune

    if not targets or any(not 0 < t < 1 for t in targets) or list(targets) != sorted(targets, reverse=True):
        raise CompressionError(f"targets must be decreasing fractions in (0, 1), got {list(targets)}")
    original = as_network(origin_net, example_inputs(trainloader))
    original_macs = count_flops(original).total_macs
    network, results = original, []
    for step, target in enumerate(targets):
        current = count_flops(network).total_macs
        folder = os.path.join(checkpointfolder, f"step_{step}") if checkpointfolder else None
        result = tuner_class(network, trainloader, valloader, flops_target=target * original_macs / current,
                             checkpointfolder=folder, **options).search()
        network = result.compressed_net
        finetune(network, trainloader, valloader, epochs=finetune_epochs, max_steps=finetune_steps,
                 teacher=original if distill else None, device=options.get("device"))
        network.eval()
        result.extra["iterate"] = {"step": step, "target_of_original": target,
                                   "macs_ratio_of_original": count_flops(network).total_macs / original_macs}
        results.append(result)
    return results
