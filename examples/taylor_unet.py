"""Taylor pruning of a UNet with skip concatenations, end to end, with no index bookkeeping.

The reference article (``shared/seeds/004``) pruned a UNet by hand: channel lists for every skip concatenation,
FLOPs down 44% but latency down only 32% because the kept channel counts were irregular. Here:

1. train a 4-level UNet to segment Fashion-MNIST garments (foreground masks) from noisy images;
2. ``TaylorPruning`` ranks channels by |activation x gradient| across the whole graph (the skips are dependency
   groups), less each channel's share of the measured CPU time at the deployment resolution (the latency
   regulariser, ``--latency-regularization``), prunes to half the MACs in a few rounds with ``round_to=8``,
   fine-tuning between rounds;
3. fine-tune once more, export both networks to ONNX, and measure CPU latency side by side (torch and
   onnxruntime, round-robin timing at a deployment resolution), reporting latency cut / MACs cut.

Run ``python examples/taylor_unet.py`` (about 8 minutes on 2 cores; ``--quick`` for a smoke run). Needs the Debian
package ``dataset-fashion-mnist``. Measured: MACs ratio 0.495, IoU 0.9285 -> 0.9213, latency cut / MACs cut 0.92
with onnxruntime and 0.88 with torch (``--latency-regularization 0``: 0.86 and 0.75, IoU 0.9278); the table is in
``docs/taylor_magnitude.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from amc.models import UNet  # noqa: E402
from bench.latency import cut_ratio, ort_runner, time_round_robin, torch_runner  # noqa: E402
from compressors import TaylorPruning  # noqa: E402
from compressors.base import top1_accuracy  # noqa: E402
from graph import capture  # noqa: E402
from graph.pruning import multiply_adds  # noqa: E402
from trainers.datasets import load_foreground_segmentation  # noqa: E402
from trainers.finetune import finetune  # noqa: E402


def mean_iou(network: torch.nn.Module, loader) -> float:
    """Foreground intersection over union over the whole loader."""
    network.eval()
    inter = union = 0
    with torch.no_grad():
        for images, masks in loader:
            predicted = network(images).argmax(dim=1).bool()
            truth = masks.bool()
            inter += int((predicted & truth).sum())
            union += int((predicted | truth).sum())
    return inter / max(union, 1)


def latency(networks: dict[str, torch.nn.Module], side: int, repeats: int, threads: int) -> dict[str, dict[str, float]]:
    """Median seconds per call of each network at ``side`` x ``side``, batch 1, in torch and onnxruntime."""
    torch.set_num_threads(threads)
    x = torch.randn(1, 1, side, side)
    result: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        runners = {"torch": {name: torch_runner(net, x) for name, net in networks.items()}, "onnxruntime": {}}
        for name, net in networks.items():
            path = net.export_onnx(os.path.join(directory, f"{name}.onnx"), x)
            runners["onnxruntime"][name] = ort_runner(path, threads, x)
        with tqdm(total=2 * repeats, desc="latency") as progress:
            for backend, table in runners.items():
                samples = time_round_robin(table, repeats, 0.2, time.perf_counter, progress)
                result[backend] = {name: statistics.median(values) for name, values in samples.items()}
                result[backend]["ratio"] = statistics.median(
                    p / u for p, u in zip(samples["pruned"], samples["unpruned"]))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny data and few steps (a smoke run)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the original UNet")
    parser.add_argument("--side", type=int, default=256, help="deployment resolution for the latency measurement")
    parser.add_argument("--repeats", type=int, default=15, help="round-robin latency repeats")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256], help="UNet level widths")
    parser.add_argument("--latency-regularization", type=float, default=1.0,
                        help="weight of each channel's share of the CPU time at the deployment resolution against "
                             "its share of the Taylor importance (0: rank by importance alone)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = load_foreground_segmentation("fashion-mnist", batch_size=32, train_limit=512 if args.quick else 8000,
                                        test_limit=256 if args.quick else 2000)
    model = UNet(in_channels=1, classes=2, widths=tuple(args.widths))
    print("training the UNet ...")
    finetune(model, data.train, epochs=1 if args.quick else args.epochs, lr=0.05, verbose=True)
    before = {"pixel accuracy": top1_accuracy(model, data.test), "IoU": mean_iou(model, data.test)}

    taylor = TaylorPruning(model, data.train, data.val, flops_target=0.5, round_to=8, steps=2 if args.quick else 4,
                           finetune_steps=10 if args.quick else 60, lr=0.01, verbose=True,
                           latency_regularization=args.latency_regularization,
                           latency_inputs=(torch.randn(1, 1, args.side, args.side),),
                           checkpointfolder=os.path.join(tempfile.gettempdir(), "taylor_unet"))
    pruned = taylor.compress()
    finetune(pruned, data.train, epochs=1, lr=0.01, max_steps=20 if args.quick else None)
    after = {"pixel accuracy": top1_accuracy(pruned, data.test), "IoU": mean_iou(pruned, data.test)}

    unpruned = capture(model.eval(), torch.randn(1, 1, args.side, args.side))
    pruned_big = pruned.eval()
    macs_ratio = multiply_adds(taylor.compressed_net) / multiply_adds(taylor.origin_net)
    timing = latency({"unpruned": unpruned, "pruned": pruned_big}, args.side, 3 if args.quick else args.repeats,
                     args.threads)
    widths = sorted({m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)})
    print("\nround  MACs        val pixel acc")
    for entry in taylor.history:
        print(f"{entry['step']:5d}  {entry['macs']:>10,d}  {entry['accuracy']:.4f}")
    print(f"\nkept conv widths: {widths} (all multiples of 8: {all(w % 8 == 0 for w in widths if w > 2)})")
    print(f"{'':16s} {'before':>9s} {'after':>9s}")
    for key in before:
        print(f"{key:16s} {before[key]:9.4f} {after[key]:9.4f}")
    print(f"MACs ratio {macs_ratio:.3f}")
    for backend, row in timing.items():
        print(f"{backend:12s} latency {row['unpruned'] * 1e3:7.2f} ms -> {row['pruned'] * 1e3:7.2f} ms "
              f"(ratio {row['ratio']:.3f}); latency cut / MACs cut = {cut_ratio(row['ratio'], macs_ratio):.2f}")


if __name__ == "__main__":
    main()
