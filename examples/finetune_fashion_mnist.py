"""The AMC wiki's CIFAR10Trainer flow on Fashion-MNIST (Debian package dataset-fashion-mnist, no download):
train → compress (ChannelPruning to half the MACs) → fine-tune → distil from the original, then print the table.

The trainer below is the wiki's Code-3 with its dunder hooks, unchanged but for the dataset. Every stage logs to
tensorboardX under ``--checkpoints_folder/<run_name>/<stage>`` and keeps ``latest.pt``/``best.pt`` checkpoints, so
``--resume`` continues a killed run. The same script runs on several processes:

    python examples/finetune_fashion_mnist.py --train_limit 12000 --epochs 3
    torchrun --nproc_per_node=2 examples/finetune_fashion_mnist.py --train_limit 12000 --epochs 3
    python examples/finetune_fashion_mnist.py --train_limit 2000 --test_limit 2000 --val_fraction 0.02 --epochs 1

Measured (``OMP_NUM_THREADS=1``, ``--train_limit 8000 --test_limit 2000 --val_fraction 0.02 --epochs 3``, 11 min on
a loaded 2-core machine), test top-1: original 0.8205, compressed to half the MACs 0.8240, fine-tuned 0.8415,
distilled 0.8140. A 3-epoch original is no better a teacher than the fine-tuned student, so distillation does not
pay here; it does with a stronger teacher (``tests/test_distillation.py``).
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.nn as nn
import torch.optim as optim

from amc.models import build_model
from compressors import ChannelPruning
from compressors.base import batch_inputs, recalibrate_batchnorm, top1_accuracy
from graph import capture
from graph.pruning import multiply_adds
from trainers import BaseDistiller, ClassificationTrainer
from trainers.datasets import load_dataset


# <class FashionMNISTTrainer>
class FashionMNISTTrainer(ClassificationTrainer):
    """The wiki's CIFAR10Trainer: the batch predictions, the losses and the stop condition, under the wiki's names
    (on ClassificationTrainer rather than BaseTrainer, so that top-1/top-5 are logged and pick best.pt)."""

    # <method: __get_val_batch_preds__>
    def __get_val_batch_preds__(self, batch_val_data, *args, **kwargs):
        inputs = batch_val_data[0]
        if self._device:
            inputs = inputs.to(self._device)
        return self._network(inputs)

    # <method: __get_val_losses__>
    def __get_val_losses__(self, batch_preds, batch_val_data, *args, **kwargs):
        labels = batch_val_data[1]
        if self._device:
            labels = labels.to(self._device)
        loss = self._criterion(batch_preds, labels)
        return {"total_loss": loss}

    # <method: __get_train_batch_preds__>
    def __get_train_batch_preds__(self, batch_train_data, *args, **kwargs):
        inputs = batch_train_data[0]
        if self._device:
            inputs = inputs.to(self._device)
        return self._network(inputs)

    # <method: __get_train_losses__>
    def __get_train_losses__(self, batch_preds, batch_train_data, *args, **kwargs):
        labels = batch_train_data[1]
        if self._device:
            labels = labels.to(self._device)
        loss = self._criterion(batch_preds, labels)
        return {"total_loss": loss}

    # <method: __if_stop_trainning__>
    def __if_stop_trainning__(self, *args, **kwargs):
        lr = self._optimizer.param_groups[-1]["lr"]
        return lr < kwargs["stop_lr"]


def make_trainer(cls, network, data, args, stage, lr, **extra):
    """A trainer of class ``cls`` set up as in the wiki: SGD, ReduceLROnPlateau, a tensorboardX log directory."""
    optimizer = optim.SGD(network.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, threshold=1e-5, patience=args.patience,
                                                     min_lr=1e-6)
    folder = os.path.join(args.checkpoints_folder, args.run_name, stage)
    return cls(train_loader=data.train, val_loader=data.val, eval_loader=None, network=network,
               criterion=nn.CrossEntropyLoss(), optimizer=optimizer, scheduler=scheduler, epochs=args.epochs,
               device=args.device, tbx_writer=folder, checkpoints_folder=folder, additional_args=args,
               verbose=args.verbose, **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_name", default="fashion_mnist")
    parser.add_argument("--model", default="resnet20", help="built-in network of amc.models")
    parser.add_argument("--learning_rate", type=float, default=5e-2)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--patience", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--train_limit", type=int, default=12000, help="training images used (of 54,000)")
    parser.add_argument("--test_limit", type=int, default=10000, help="test images evaluated (of 10,000)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="training images held out for validation")
    parser.add_argument("--checkpoints_folder", default="./fashion_mnist_checkpoints")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--flops_target", type=float, default=0.5, help="MACs kept by channel pruning")
    parser.add_argument("--device", default="auto", help="default: the accelerator when there is one")
    parser.add_argument("--resume", action="store_true", help="continue every stage from its latest checkpoint")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset("fashion-mnist", batch_size=args.batch_size, train_limit=args.train_limit,
                        test_limit=args.test_limit, val_fraction=args.val_fraction)
    main_process = int(os.environ.get("RANK", 0)) == 0

    network = build_model(args.model, in_channels=1, num_classes=data.num_classes)
    trainer = make_trainer(FashionMNISTTrainer, network, data, args, "original", args.learning_rate)
    trainer.__run__(stop_lr=1e-6, resume=args.resume)
    original = capture(network.cpu().eval(), next(iter(data.test))[0][:1])
    # A few epochs leave BatchNorm's running statistics behind the weights; re-estimating them makes the original
    # (and so the teacher) as good as its weights allow.
    recalibrate_batchnorm(original, (batch_inputs(batch) for batch in data.train))

    compressor = ChannelPruning(original, data.train, data.val, trainset_ratio=0.1, flops_target=args.flops_target)
    compressed = compressor.compress()
    pruned_top1 = top1_accuracy(compressed, data.test)

    tuned = copy.deepcopy(compressed)
    trainer = make_trainer(FashionMNISTTrainer, tuned, data, args, "finetuned", args.learning_rate / 5)
    trainer.__run__(stop_lr=1e-6, resume=args.resume)

    student = copy.deepcopy(compressed)
    hints = [name for name in ("layers.2.relu", "layers.5.relu") if name in {n.name for n in student.graph_nodes}]
    distiller = make_trainer(BaseDistiller, student, data, args, "distilled", args.learning_rate / 5,
                             teacher=original, temperature=4.0, alpha=0.9, hints=hints)
    distiller.__run__(stop_lr=1e-6, resume=args.resume)

    if main_process:
        rows = [("original", original), ("compressed", compressed), ("fine-tuned", tuned.cpu()),
                ("distilled", student.cpu())]
        base_macs = multiply_adds(original)
        print(f"\n{'network':12s} {'test top-1':>10s} {'MACs':>12s} {'ratio':>6s}")
        for name, net in rows:
            accuracy = pruned_top1 if name == "compressed" else top1_accuracy(net, data.test)
            macs = multiply_adds(net)
            print(f"{name:12s} {accuracy:10.4f} {macs:12,d} {macs / base_macs:6.3f}")


if __name__ == "__main__":
    main()
