"""``amc finetune``: fine-tune a saved network (``.pkl``/``.json``/``.vnmodel``) on a built-in dataset, optionally
distilling from the original network, print test top-1 before and after, and save the result.

    amc finetune pruned.pkl --data digits --epochs 3 --teacher original.pkl -o tuned.pkl

Runs under ``torchrun --nproc_per_node=N -m amc.cli finetune ...`` too (one shard of the data per process; rank 0
prints and saves). ``--checkpoints DIR --resume`` continues a killed run from its last finished epoch.
"""
from __future__ import annotations

import argparse
import os

from trainers.devices import PRECISIONS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``amc finetune`` to the ``amc`` subcommands."""
    from trainers.datasets import DATASETS

    parser = commands.add_parser(
        "finetune", help="fine-tune a saved network on a built-in dataset (optionally distilling from the original)",
        description="Fine-tune a saved (compressed) network with SGD and a cosine learning rate, optionally "
                    "distilling from the original network; prints test top-1 before and after.")
    parser.add_argument("model", help="saved network to fine-tune (.pkl/.json/.vnmodel) taking the data's images")
    parser.add_argument("--data", default="digits", choices=sorted(DATASETS), help="dataset (offline)")
    parser.add_argument("--epochs", type=_positive_int, default=3, help="training epochs")
    parser.add_argument("--max-steps", type=_positive_int, help="stop after this many optimiser steps")
    parser.add_argument("--lr", type=float, default=0.01, help="initial learning rate (cosine-annealed to 0)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (per process)")
    parser.add_argument("--train-limit", type=_positive_int, help="use only this many training images")
    parser.add_argument("--teacher", metavar="PATH", help="original network (saved) to distil from")
    parser.add_argument("--temperature", type=float, default=4.0, help="distillation temperature")
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the distillation loss (rest: labels)")
    parser.add_argument("--hint", nargs="*", default=[], metavar="NODE",
                        help="node names present in both networks whose features the student should match")
    parser.add_argument("--hint-weight", type=float, default=0.1, help="weight of the feature-hint loss")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="autocast precision")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:1, ... (default auto: the accelerator when there is one)")
    parser.add_argument("--checkpoints", metavar="DIR", help="write latest.pt/best.pt here after every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/latest.pt (needs --checkpoints)")
    parser.add_argument("--logdir", metavar="DIR", help="tensorboardX log directory")
    parser.add_argument("-o", "--output", help="where to save the fine-tuned network (.pkl, .json or .vnmodel)")
    parser.add_argument("--verbose", action="store_true", help="progress bars and a line per epoch")
    parser.set_defaults(run=finetune_command)


def finetune_command(args: argparse.Namespace) -> int:
    """Load, check that the network takes the data, fine-tune, print the before/after table, save on rank 0."""
    from amc.cli import check_network_output
    from compressors.base import top1_accuracy
    from graph.serialization import save
    from trainers.datasets import load_dataset
    from trainers.finetune import finetune

    check_network_output(args.output)
    if args.resume and not args.checkpoints:
        raise ValueError("--resume needs --checkpoints DIR")
    data = load_dataset(args.data, batch_size=args.batch_size, train_limit=args.train_limit)
    network = _load_for(args.model, data, "model")
    teacher = _load_for(args.teacher, data, "--teacher") if args.teacher else None
    before = top1_accuracy(network, data.test)
    result = finetune(network, data.train, data.val, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                      momentum=args.momentum, weight_decay=args.weight_decay, teacher=teacher,
                      temperature=args.temperature, alpha=args.alpha, hints=args.hint, hint_weight=args.hint_weight,
                      device=args.device, precision=args.precision, checkpoints_folder=args.checkpoints,
                      resume=args.resume, tbx_writer=args.logdir, verbose=args.verbose)
    network.eval()
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    after = top1_accuracy(network, data.test, device=next(network.parameters()).device)
    mode = f"distilled from {args.teacher} (T={args.temperature}, alpha={args.alpha})" if teacher else "labels only"
    print(f"fine-tuned {result['steps']} steps on {args.data}, {mode}")
    print(f"{'test top-1':12s} {'before':>8s} {'after':>8s}\n{'':12s} {before:8.4f} {after:8.4f}")
    if args.output:
        print(f"saved to {save(network.cpu(), args.output)}")
    else:
        print("not saved: give -o PATH (.pkl, .json or .vnmodel) to keep the fine-tuned network")
    return 0


def _load_for(path: str, data, what: str):
    """The saved network at ``path``, checked to take ``data``'s images and return one logit per class."""
    import torch

    from amc.cli import load_network

    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: file not found: {path}")
    network = load_network(path, (1, *data.input_shape))
    images = next(iter(data.test))[0][:2]
    try:
        with torch.no_grad():
            logits = network.eval()(images)
    except Exception as error:  # noqa: BLE001 - any failure here means the network does not take these images
        raise ValueError(f"{what} {path} does not run on {tuple(images.shape[1:])} images of the dataset: "
                         f"{error}") from error
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, data.num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{what} {path} returns {shape} for 2 images, not (2, {data.num_classes}) class logits")
    return network
