"""Multi-process training: the same script under ``torchrun --nproc_per_node=2`` (DDP over gloo on the CPU) matches
the single-process run on the same global batch, metrics are reduced over both processes, and only rank 0 writes."""
import glob
import os
import runpy
import subprocess
import sys
import textwrap

import pytest
import torch

from trainers.checkpoint import load_checkpoint
from trainers.distributed import DistributedContext, ShardSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 32

JOB = textwrap.dedent(f'''
    """One epoch on 640 digits, global batch {GLOBAL_BATCH} split over the processes torchrun starts."""
    import os
    import sys

    import torch
    import torch.nn as nn
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    from trainers import ClassificationTrainer


    def build(folder):
        world = int(os.environ.get("WORLD_SIZE", 1))
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
        labels = torch.tensor(digits.target)
        train = DataLoader(TensorDataset(images[:640], labels[:640]), batch_size={GLOBAL_BATCH} // world)
        val = DataLoader(TensorDataset(images[640:1000], labels[640:1000]), batch_size=50)
        torch.manual_seed(0)
        network = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
        return ClassificationTrainer(train, val, None, network, None, optimizer, None, 1, "cpu",
                                     os.path.join(folder, "runs"), folder, None, verbose=False)


    if __name__ == "__main__":
        torch.set_num_threads(1)
        trainer = build(sys.argv[1])
        summary = trainer.run()
        if trainer.distributed.is_main:
            torch.save({{"world": trainer.distributed.world_size, "state": trainer.network.state_dict(),
                        "summary": summary}}, os.path.join(sys.argv[1], "result.pt"))
''')


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    script, folder = tmp_path / "job.py", tmp_path / "ddp"
    script.write_text(JOB)
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(folder)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(folder / "result.pt", weights_only=False)
    assert result["world"] == 2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = runpy.run_path(str(script), run_name="job")["build"](str(tmp_path / "single"))
        summary = single.run()
    finally:
        torch.set_num_threads(threads)
    assert summary["global_step"] == 640 // GLOBAL_BATCH == result["summary"]["global_step"]
    for name, tensor in single.network.state_dict().items():
        torch.testing.assert_close(result["state"][name], tensor, rtol=1e-4, atol=1e-5)
    for key in ("train_total_loss", "train_top1", "val_total_loss", "val_top1"):
        assert result["summary"][key] == pytest.approx(summary[key], rel=1e-4, abs=1e-6), key
    assert summary["val_top1"] > 0.6  # one unshuffled epoch from 0.1
    # Only rank 0 logs and checkpoints: one event file, one checkpoint pair, and it holds the trained weights.
    assert len(glob.glob(str(folder / "runs" / "events.out.tfevents.*"))) == 1
    assert sorted(f for f in os.listdir(folder) if f.endswith(".pt")) == ["best.pt", "latest.pt", "result.pt"]
    checkpoint = load_checkpoint(folder / "latest.pt")
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in result["state"].items())


def test_evaluation_shards_cover_every_example_exactly_once():
    shards = [list(ShardSampler(11, 3, rank)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))
    assert [len(ShardSampler(11, 3, rank)) for rank in range(3)] == [4, 4, 3]


def test_single_process_context_changes_nothing():
    context = DistributedContext.from_environment(torch.device("cpu"))
    network = torch.nn.Linear(2, 2)
    assert not context.enabled and context.is_main
    assert context.wrap(network, torch.device("cpu")) is network
    assert context.sum({"a": 1.5, "b": 2.0}) == {"a": 1.5, "b": 2.0}


def test_training_shards_split_each_shuffled_epoch_between_the_processes():
    from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

    dataset = TensorDataset(torch.arange(20))
    loader = DataLoader(dataset, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(7))
    shards = [DistributedContext(world_size=2, rank=rank).shard(loader, train=True) for rank in range(2)]
    for epoch in range(2):
        for shard in shards:
            shard.sampler.set_epoch(epoch)
        seen = [torch.cat([batch[0] for batch in shard]).tolist() for shard in shards]
        assert sorted(seen[0] + seen[1]) == list(range(20)) and len(seen[0]) == len(seen[1]) == 10
        assert seen[0] != sorted(seen[0])  # shuffled
    weighted = DataLoader(dataset, batch_size=3, sampler=WeightedRandomSampler([1.0] * 20, 20))
    with pytest.raises(ValueError, match="cannot shard a DataLoader with a WeightedRandomSampler"):
        DistributedContext(world_size=2, rank=0).shard(weighted, train=True)
