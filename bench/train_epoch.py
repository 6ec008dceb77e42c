"""Epoch time of the trainers on the CPU: one process (fp32, bf16 autocast) against two torchrun processes, and
whether the two-process run ends where the one-process run does on the same global batch.

Trains ResNet-20 (``amc.models``, one input channel) for one epoch on ``--images`` Fashion-MNIST training images
with :class:`trainers.ClassificationTrainer`; the data order is fixed (no shuffling) so both runs see the same
global batches. Prints a table and writes ``bench/results/train_epoch.md``.

    python bench/train_epoch.py --images 4096
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "train_epoch.md")


def build(images: int, global_batch: int, precision: str):
    """The trainer of one process: ResNet-20 on the first ``images`` Fashion-MNIST images, unshuffled."""
    from amc.models import build_model
    from trainers import ClassificationTrainer
    from trainers.datasets import load_dataset

    world = int(os.environ.get("WORLD_SIZE", 1))
    splits = load_dataset("fashion-mnist", batch_size=global_batch, train_limit=images, test_limit=2000)
    train = DataLoader(TensorDataset(*splits.train.dataset.tensors), batch_size=global_batch // world)
    torch.manual_seed(0)
    network = build_model("resnet20", in_channels=1, num_classes=10)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
    return ClassificationTrainer(train, splits.test, None, network, nn.CrossEntropyLoss(), optimizer, None, 1, "cpu",
                                 None, None, None, precision=precision, verbose=False)


def worker(args: argparse.Namespace) -> None:
    """One process of a run: train one epoch, rank 0 writes the summary and the weights' checksum as JSON."""
    torch.set_num_threads(args.threads)
    trainer = build(args.images, args.global_batch, args.precision)
    summary = trainer.run()
    if trainer.distributed.is_main:
        weights = torch.cat([p.detach().flatten() for p in trainer.network.parameters()])
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"epoch_time": summary["epoch_time"], "val_top1": summary["val_top1"],
                       "train_total_loss": summary["train_total_loss"], "weights": weights.tolist()}, handle)


def launch(args: argparse.Namespace, processes: int, threads: int, precision: str) -> dict:
    """Run :func:`worker` in ``processes`` processes (torchrun when more than one) and read rank 0's result."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        script = [os.path.abspath(__file__), "--worker", "--out", out, "--threads", str(threads), "--images",
                  str(args.images), "--global-batch", str(args.global_batch), "--precision", precision]
        command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                   if processes > 1 else [sys.executable]) + script
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out, encoding="utf-8") as handle:
            return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="Fashion-MNIST training images in the epoch")
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    runs = {"1 process x 1 thread, fp32": (1, 1, "fp32"),
            "2 processes x 1 thread (torchrun, gloo), fp32": (2, 1, "fp32"),
            "1 process x 2 threads, fp32": (1, 2, "fp32"),
            "1 process x 2 threads, bf16 autocast": (1, 2, "bf16")}
    results, load_before = {}, os.getloadavg()[0]
    for label, (processes, threads, precision) in runs.items():
        started = time.perf_counter()
        results[label] = launch(args, processes, threads, precision)
        results[label]["wall"] = time.perf_counter() - started
        print(f"{label}: epoch {results[label]['epoch_time']:.1f} s", flush=True)
    single, double = (torch.tensor(results[label]["weights"]) for label in (
        "1 process x 1 thread, fp32", "2 processes x 1 thread (torchrun, gloo), fp32"))
    gap = float((single - double).abs().max())
    lines = [f"# Trainer epoch time on the CPU ({os.cpu_count()} cores)", "",
             f"ResNet-20, one epoch of {args.images} Fashion-MNIST images, global batch {args.global_batch}, "
             f"`python bench/train_epoch.py --images {args.images}`. Load average {load_before:.1f} before and "
             f"{os.getloadavg()[0]:.1f} after the runs: on a shared machine timings are noisy, and threads of one "
             "process that wait for each other suffer most.", "",
             "| run | epoch time (s) | images/s | val top-1 | train loss |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, result in results.items():
        lines.append(f"| {label} | {result['epoch_time']:.1f} | {args.images / result['epoch_time']:.0f} | "
                     f"{result['val_top1']:.4f} | {result['train_total_loss']:.4f} |")
    lines += ["", f"Two processes vs one on the same global batches: max |weight difference| after the epoch "
                  f"{gap:.2e} over {single.numel():,d} weights. BatchNorm normalises each process's half of the "
                  "batch on its own, so BatchNorm networks drift apart; `tests/test_distributed.py` checks that a "
                  "network without BatchNorm matches to 1e-5."]
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    from graph.serialization.atomic import atomic_path

    with atomic_path(RESULTS) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
