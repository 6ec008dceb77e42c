"""Training checkpoints: written atomically (a temporary file renamed over the target, so a killed process never
leaves a torn file), loaded with a clear error when the network's shapes differ from the saved ones.

A checkpoint is a dict saved with ``torch.save``: ``format``, ``epoch`` (epochs completed), ``global_step``,
``model``, ``optimizer``, ``scheduler``, ``scaler``, ``best_metric``, ``monitor``, ``history``, ``rng`` and
``extra`` (state a subclass adds, such as a distiller's hint adapters).
"""
from __future__ import annotations

import os
import random
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn

from graph.serialization.atomic import atomic_path

CHECKPOINT_FORMAT = "amc-trainer-checkpoint-v1"
LATEST_NAME, BEST_NAME = "latest.pt", "best.pt"


class CheckpointError(ValueError):
    """A checkpoint is missing, not a trainer checkpoint, or does not fit the network it is loaded into."""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Write ``state`` (a checkpoint dict) to ``path`` atomically; returns the path."""
    path = os.fspath(path)
    with atomic_path(path) as temporary:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, temporary)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint dict saved at ``path``; :class:`CheckpointError` when it is missing or not a trainer
    checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a trainer checkpoint ({CHECKPOINT_FORMAT})")
    return state


def shape_mismatches(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """One line per tensor of ``state_dict`` missing from ``module``, absent from ``state_dict`` or of another
    shape (the lines name the tensor and both shapes)."""
    own = module.state_dict()
    problems = [f"{name}: saved {tuple(tensor.shape)}, network has {tuple(own[name].shape)}"
                for name, tensor in state_dict.items() if name in own and own[name].shape != tensor.shape]
    problems += [f"{name}: in the checkpoint, not in the network" for name in state_dict if name not in own]
    problems += [f"{name}: in the network, not in the checkpoint" for name in own if name not in state_dict]
    return problems


def load_model_state(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``module`` strictly; :class:`CheckpointError` listing every tensor whose name or
    shape differs (a pruned network's checkpoint only fits that pruned network)."""
    problems = shape_mismatches(module, state_dict)
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise CheckpointError(f"the {source} does not fit this network ({len(problems)} tensors differ; was it "
                              f"saved from a network pruned differently?):\n  {shown}")
    module.load_state_dict(state_dict)


def rng_states(generators: Iterable[torch.Generator] = ()) -> dict[str, Any]:
    """The states of Python's, numpy's, torch's (CPU and every CUDA device) generators and of ``generators``
    (such as a DataLoader's shuffling generator)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generators": [generator.get_state() for generator in generators]}


def restore_rng_states(states: Mapping[str, Any], generators: Iterable[torch.Generator] = ()) -> None:
    """Restore what :func:`rng_states` saved (CUDA states only where as many devices are present)."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    for generator, state in zip(generators, states["generators"]):
        generator.set_state(state)
