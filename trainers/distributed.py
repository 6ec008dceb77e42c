"""Multi-process training under ``torchrun``: process group set-up, data sharding, metric reduction.

``DistributedContext.from_environment(device)`` reads torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; with more
than one process it joins the process group (gloo on the CPU, nccl on CUDA). The trainer wraps the network in
``DistributedDataParallel``, gives each process its shard of the data (``DistributedSampler`` for training, an
unpadded shard for evaluation so metrics count every example once), sums metrics across processes, and lets only
rank 0 write logs and checkpoints. With one process every method is a cheap no-op.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank``, in order and without padding: the processes together see each
    example exactly once (for evaluation, where ``DistributedSampler``'s padding would count some twice)."""

    def __init__(self, size: int, num_replicas: int, rank: int):
        self.size, self.num_replicas, self.rank = size, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.num_replicas))


@dataclass
class DistributedContext:
    """Where this process stands: ``world_size`` processes, this one is ``rank`` (``local_rank`` on its host)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_environment(cls, device: torch.device) -> "DistributedContext":
        """The context torchrun describes in the environment; joins (once) the default process group when there is
        more than one process, with the backend suited to ``device``."""
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if world_size <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            atexit.register(_destroy_process_group)
        return cls(world_size=dist.get_world_size(), rank=dist.get_rank(),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0 (the one that logs and writes checkpoints)."""
        return self.rank == 0

    def wrap(self, network: nn.Module, device: torch.device) -> nn.Module:
        """``network`` wrapped in ``DistributedDataParallel`` (unchanged with one process)."""
        if not self.enabled:
            return network
        return DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)

    def shard(self, loader: DataLoader | None, train: bool) -> DataLoader | None:
        """``loader`` rebuilt to read only this process's share: a ``DistributedSampler`` (shuffled when the loader
        shuffled, seeded from its generator so every process agrees) for training, a :class:`ShardSampler` for
        evaluation. The batch size stays the per-process batch size. A loader that already has a distributed
        sampler is kept; other custom samplers are an error (their weighting would be lost)."""
        if not self.enabled or loader is None:
            return loader
        if loader.batch_size is None:
            raise ValueError("distributed training needs DataLoaders built with batch_size (not a batch_sampler)")
        if isinstance(loader.sampler, (DistributedSampler, ShardSampler)):
            return loader
        if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
            raise ValueError(f"cannot shard a DataLoader with a {type(loader.sampler).__name__} over processes: "
                             "give it a DistributedSampler yourself, or use shuffle=True/False")
        dataset = loader.dataset
        if train:
            seed = loader.generator.initial_seed() if loader.generator is not None else 0
            sampler: Sampler = DistributedSampler(dataset, self.world_size, self.rank,
                                                  shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
                                                  drop_last=loader.drop_last)
        else:
            sampler = ShardSampler(len(dataset), self.world_size, self.rank)
        return DataLoader(dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                          worker_init_fn=loader.worker_init_fn, timeout=loader.timeout)

    def sum(self, values: Mapping[str, float]) -> dict[str, float]:
        """``values`` summed over every process (the same keys on each, in the same order)."""
        if not self.enabled:
            return dict(values)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return dict(zip(values, tensor.tolist()))

    def average_gradients(self, parameters: list[nn.Parameter]) -> None:
        """Average the gradients of ``parameters`` (trained outside ``DistributedDataParallel``) over processes."""
        if not self.enabled:
            return
        for parameter in parameters:
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad /= self.world_size

    def barrier(self) -> None:
        """Wait for every process (a no-op with one)."""
        if self.enabled:
            dist.barrier()


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
