"""``amc compress``: the AMC wiki's pipeline in one command: capture → compress → fine-tune → report → save.

With no arguments it trains a small residual + concat CNN for a few seconds on scikit-learn's bundled digits,
compresses it to half the multiply-adds with :class:`~compressors.ChannelPruning`, fine-tunes one epoch and prints
the before/after table. Methods are looked up in :data:`METHODS` (one small factory per method); add one there.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from graph.network import ReconstructedNetwork

CompressFunction = Callable[[ReconstructedNetwork, Any, argparse.Namespace], ReconstructedNetwork]


def _data_driven(class_name: str, **fixed: Any) -> CompressFunction:
    """A factory for a compressor of :mod:`compressors` that takes the wiki's data arguments and ``flops_target``."""

    def run(network: ReconstructedNetwork, data: Any, args: argparse.Namespace) -> ReconstructedNetwork:
        import compressors

        compressor = getattr(compressors, class_name)(
            network, data.train, data.val, trainset_ratio=args.calibration_ratio,
            sampled_pixels_per_img=args.sampled_pixels, flops_target=1 / args.speedup, verbose=args.verbose,
            **fixed)
        return compressor.compress()

    return run


def _taylor(network: ReconstructedNetwork, data: Any, args: argparse.Namespace) -> ReconstructedNetwork:
    from compressors import TaylorPruning

    return TaylorPruning(network, data.train, data.val, flops_target=1 / args.speedup, verbose=args.verbose).compress()


def _weight_norm(importance: str) -> CompressFunction:
    """Plain structured pruning by weight norm to the MACs target, then BatchNorm recalibration."""

    def run(network: ReconstructedNetwork, data: Any, args: argparse.Namespace) -> ReconstructedNetwork:
        from compressors.base import batch_inputs, recalibrate_batchnorm
        from graph.pruning import prune

        pruned = prune(network, flops_target=1 / args.speedup, importance=importance)
        recalibrate_batchnorm(pruned, (batch_inputs(batch) for batch in data.train))
        return pruned

    return run


METHODS: dict[str, CompressFunction] = {
    "channel-pruning": _data_driven("ChannelPruning"),
    "low-rank": _data_driven("LowRankDecomposition"),
    "low-rank-nonlinear": _data_driven("LowRankDecomposition", nonlinear_case=True),
    "taylor": _taylor,
    "l1": _weight_norm("l1"),
}


def _speedup(text: str) -> float:
    value = float(text)
    if not value > 1:
        raise argparse.ArgumentTypeError(f"--speedup must be greater than 1 (2 = half the MACs), got {text}")
    return value


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments :func:`original_network` and the data loading read: ``--model``, ``--data``,
    ``--train-epochs``, ``--train-limit``, ``--batch-size`` (shared by ``amc compress`` and ``amc search``)."""
    from amc.models import MODELS
    from trainers.datasets import DATASETS

    parser.add_argument("--model", default="residual-concat",
                        help=f"built-in network ({', '.join(sorted(MODELS))}), trained here on --data, or a saved "
                             "network (.pkl/.json/.vnmodel) taking the data's images")
    parser.add_argument("--data", default="digits", choices=sorted(DATASETS), help="dataset (offline)")
    parser.add_argument("--train-epochs", type=int, help="epochs to train a built-in network first "
                                                         "(default 3; 0 for a saved network)")
    parser.add_argument("--train-limit", type=int, help="use only this many training images (quick runs)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``amc compress`` to the ``amc`` subcommands."""
    from amc.cli import fraction

    parser = commands.add_parser(
        "compress", help="train or load a network, compress it, fine-tune, print before/after and save",
        description="Capture -> compress -> fine-tune -> report -> save. With no arguments: a small CNN trained "
                    "for a few seconds on digits, compressed 2x with channel pruning.")
    add_network_arguments(parser)
    parser.add_argument("--method", default="channel-pruning", choices=sorted(METHODS), help="compressor")
    parser.add_argument("--speedup", type=_speedup, default=2.0, help="MACs reduction factor (2 = half the MACs)")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="fine-tuning epochs after compression")
    parser.add_argument("--no-distill", action="store_true", help="fine-tune on labels only (default: logit "
                                                                   "distillation from the original network)")
    parser.add_argument("--calibration-ratio", type=fraction(include_one=True), default=0.25,
                        help="fraction of the training batches used as calibration data")
    parser.add_argument("--sampled-pixels", type=int, default=10, help="positions sampled per image and layer")
    parser.add_argument("-o", "--output", metavar="DIR",
                        help="directory for compressed.{pkl,json,vnmodel,onnx}, a drawing and report.json "
                             "(created if its parent exists)")
    parser.add_argument("--verbose", action="store_true", help="progress bars and per-layer choices")
    parser.set_defaults(run=compress_command)


def compress_command(args: argparse.Namespace) -> int:
    """Run the pipeline and print the before/after table; save into ``--output`` when given."""
    from amc.cli import check_output_path
    from trainers.datasets import load_dataset

    if args.output:
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise FileExistsError(f"--output must be a directory, and {args.output} is a file")
        check_output_path(os.path.normpath(args.output))
    data = load_dataset(args.data, batch_size=args.batch_size, train_limit=args.train_limit)
    original = original_network(args, data)
    original_accuracy = _accuracy(original, data.test)
    started = time.perf_counter()
    compressed = METHODS[args.method](original, data, args)
    seconds = time.perf_counter() - started
    compressed_accuracy = _accuracy(compressed, data.test)
    if args.finetune_epochs > 0:
        from trainers.finetune import finetune

        finetune(compressed, data.train, data.val, epochs=args.finetune_epochs,
                 teacher=None if args.no_distill else original, verbose=args.verbose)
        compressed.eval()
    tuned_accuracy = _accuracy(compressed, data.test) if args.finetune_epochs > 0 else None
    example = next(iter(data.test))[0][:1]
    report = _report(original, compressed, example, original_accuracy, compressed_accuracy, tuned_accuracy,
                     seconds, args)
    print(_table(report))
    if args.output:
        for path in _save(compressed, report, example, args.output):
            print(f"wrote {path}")
    else:
        print("not saved: give -o DIR to keep the compressed network (.pkl, .json, .vnmodel, .onnx) and a drawing")
    return 0


def original_network(args: argparse.Namespace, data: Any) -> ReconstructedNetwork:
    """The built-in model trained on the data (or the saved network, trained further only when asked), captured."""
    from amc.models import MODELS, build_model
    from graph import capture

    if args.model in MODELS:
        model: nn.Module = build_model(args.model, data.input_shape[0], data.num_classes)
        epochs = 3 if args.train_epochs is None else args.train_epochs
    else:
        from amc.cli import load_network

        model = load_network(args.model, (1, *data.input_shape))
        epochs = args.train_epochs or 0
    if epochs > 0:
        from trainers.finetune import finetune

        print(f"training {args.model} on {args.data} for {epochs} epoch(s) ...")
        finetune(model, data.train, data.val, epochs=epochs, lr=0.05, verbose=args.verbose)
    model.eval()
    if isinstance(model, ReconstructedNetwork):
        return model
    return capture(model, next(iter(data.test))[0][:1])  # MACs are counted at the captured shape: one image


def _accuracy(network: nn.Module, loader: Any) -> float:
    from compressors.base import top1_accuracy

    return top1_accuracy(network, loader)


def cpu_latencies_ms(networks: dict[str, nn.Module], example: torch.Tensor, repeats: int = 30) -> dict[str, float]:
    """Median CPU latency (ms) of one forward of each network on ``example``, measured round robin (so load on a
    shared machine hits every network alike), after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in networks}
    with torch.no_grad():
        for network in networks.values():
            network.eval()(example)
        for _ in range(repeats):
            for name, network in networks.items():
                started = time.perf_counter()
                network(example)
                times[name].append((time.perf_counter() - started) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def _report(original: ReconstructedNetwork, compressed: ReconstructedNetwork, example: torch.Tensor,
            original_accuracy: float, compressed_accuracy: float, tuned_accuracy: float | None, seconds: float,
            args: argparse.Namespace) -> dict[str, Any]:
    from graph.pruning import multiply_adds

    latency = cpu_latencies_ms({"original": original, "compressed": compressed}, example)
    return {"model": args.model, "data": args.data, "method": args.method, "speedup_asked": args.speedup,
            "compression_seconds": round(seconds, 2),
            "macs": [multiply_adds(original), multiply_adds(compressed)],
            "params": [sum(p.numel() for p in n.parameters()) for n in (original, compressed)],
            "top1": [original_accuracy, compressed_accuracy],
            "top1_after_finetune": tuned_accuracy, "finetune_epochs": args.finetune_epochs,
            "cpu_latency_ms_batch1": [latency["original"], latency["compressed"]]}


def _table(report: dict[str, Any]) -> str:
    """The before/after table as text."""
    rows = [f"{report['method']} on {report['model']} ({report['data']}), compressed in "
            f"{report['compression_seconds']:.1f} s", f"{'':28s} {'original':>14s} {'compressed':>14s} {'ratio':>7s}"]
    for label, key, fmt in (("MACs", "macs", "{:14,d}"), ("params", "params", "{:14,d}"),
                            ("test top-1 (no fine-tuning)", "top1", "{:14.4f}"),
                            ("CPU latency, batch 1 (ms)", "cpu_latency_ms_batch1", "{:14.3f}")):
        old, new = report[key]
        rows.append(f"{label:28s} {fmt.format(old)} {fmt.format(new)} {new / old if old else float('nan'):7.3f}")
    if report["top1_after_finetune"] is not None:
        label = f"test top-1 ({report['finetune_epochs']} ep. fine-tune)"
        rows.append(f"{label:28s} {'':14s} {report['top1_after_finetune']:14.4f}")
    return "\n".join(rows)


def _save(network: ReconstructedNetwork, report: dict[str, Any], example: torch.Tensor, folder: str) -> list[str]:
    """Write the network in every format, a drawing and ``report.json`` into ``folder``; returns the paths."""
    from graph.serialization.atomic import atomic_path

    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, "compressed")
    written = [network.save(pkl=base + ".pkl"), network.save_to_json(file=base + ".json"),
               network.save_to_vnmodel(pkl=base + ".vnmodel", model_base_size_hw=tuple(example.shape[-2:])),
               network.export_onnx(base + ".onnx", example), network.draw(base + ".svg")]
    report_path = os.path.join(folder, "report.json")
    with atomic_path(report_path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return [*written, report_path]
