"""Benchmark low-rank decomposition on a trained network: which factors (weight SVD, data-driven, nonlinear) and
which rank allocation (uniform per-layer ``compress_ratio`` vs whole-network ``flops_target``) keep accuracy at 2x
and 3x fewer multiply-adds, without fine-tuning (and, with ``--finetune-steps``, after a short fine-tune).

A built-in model (``amc/models.py``) is trained on Fashion-MNIST (or digits) once and cached outside git
(``--cache``, default ``~/.cache/amc-bench``). Each variant is then decomposed from the same trained network with
``compressors.LowRankDecomposition``; the MACs ratio is measured with ``rnet.flops()`` side by side with the
original's, accuracy on the test split, and the compression time. The uniform rows ask every decomposable layer
for ``1 - 1/speedup`` of its MACs; layers that cannot be decomposed keep theirs, so they land above the target.

Run ``python bench/low_rank.py`` (``--help`` for settings); the table is printed and written to
``bench/results/low_rank_MODEL.md`` with an accuracy-vs-MACs plot beside it (``.png``).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from amc.models import build_model  # noqa: E402
from compressors import LowRankDecomposition  # noqa: E402
from compressors.base import top1_accuracy  # noqa: E402
from graph import capture  # noqa: E402
from graph.serialization.atomic import atomic_path  # noqa: E402
from trainers.datasets import load_dataset  # noqa: E402
from trainers.finetune import finetune  # noqa: E402

VARIANTS = {"weight SVD": {"method": "weight"}, "data": {"method": "data"},
            "data, nonlinear": {"method": "data", "nonlinear_case": True}}
ALLOCATIONS = ("flops_target", "compress_ratio")


def trained_model(args: argparse.Namespace, data) -> torch.nn.Module:
    """The built-in model trained with :func:`trainers.finetune` (cached by its settings)."""
    os.makedirs(args.cache, exist_ok=True)
    path = os.path.join(args.cache, f"{args.model}-{args.data}-e{args.epochs}-n{args.train_limit}-s{args.seed}.pt")
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.input_shape[0], data.num_classes)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        finetune(model, data.train, epochs=args.epochs, lr=args.lr)
        with atomic_path(path) as temporary:
            torch.save(model.state_dict(), temporary)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="residual-concat")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--train-limit", type=int, default=20000, help="training images used (speed)")
    parser.add_argument("--test-limit", type=int, default=5000)
    parser.add_argument("--calibration-ratio", type=float, default=0.05, help="trainset_ratio for calibration")
    parser.add_argument("--sampled-pixels", type=int, default=10)
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS), choices=ALLOCATIONS,
                        help="how ranks are chosen: whole-network flops_target and/or uniform compress_ratio")
    parser.add_argument("--finetune-steps", type=int, default=0, help="SGD steps of fine-tuning after compression")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/amc-bench"))
    parser.add_argument("--out", help="the table's path (default bench/results/low_rank_MODEL.md)")
    args = parser.parse_args()
    args.out = args.out or os.path.join(ROOT, "bench", "results", f"low_rank_{args.model}.md")

    data = load_dataset(args.data, batch_size=64, train_limit=args.train_limit, test_limit=args.test_limit,
                        seed=args.seed)
    model = trained_model(args, data)
    original = capture(model, next(iter(data.train))[0])
    original_macs = original.flops().total_macs
    original_accuracy = top1_accuracy(original, data.test)
    rows = [("original", "-", 1.0, original_accuracy, None, 0.0)]
    for speedup in args.speedups:
        for allocation in args.allocations:
            target = {"flops_target": 1 / speedup} if allocation == "flops_target" else \
                {"compress_ratio": 1 - 1 / speedup}
            for variant, options in VARIANTS.items():
                torch.manual_seed(args.seed)
                start = time.perf_counter()
                compressor = LowRankDecomposition(original, data.train, data.val,
                                                  trainset_ratio=args.calibration_ratio,
                                                  sampled_pixels_per_img=args.sampled_pixels, **target, **options)
                network = compressor.compress()
                seconds = time.perf_counter() - start
                ratio = network.flops().total_macs / original_macs
                accuracy = top1_accuracy(network, data.test)
                tuned = None
                if args.finetune_steps:
                    tuned_network = copy.deepcopy(network)
                    finetune(tuned_network, data.train, max_steps=args.finetune_steps, lr=0.01)
                    tuned = top1_accuracy(tuned_network, data.test)
                rows.append((f"{variant} ({speedup:g}x)", allocation, ratio, accuracy, tuned, seconds))
                print(f"{rows[-1][0]:<26} {allocation:<15} MACs {ratio:.3f}  top-1 {accuracy:.4f}"
                      + (f"  tuned {tuned:.4f}" if tuned is not None else "") + f"  {seconds:.1f} s", flush=True)
    write(args, rows, original_macs)


def write(args: argparse.Namespace, rows: list[tuple], original_macs: int) -> None:
    """The markdown table (and plot) of ``rows``."""
    lines = [f"# Low-rank decomposition: {args.model} on {args.data}", "",
             f"`python bench/low_rank.py --model {args.model} --data {args.data} --epochs {args.epochs} "
             f"--train-limit {args.train_limit} --test-limit {args.test_limit} --allocations "
             f"{' '.join(args.allocations)} --calibration-ratio "
             f"{args.calibration_ratio} --sampled-pixels {args.sampled_pixels} --finetune-steps {args.finetune_steps}`"
             f"; original {original_macs:,} MACs at the captured batch; no fine-tuning unless a tuned column is "
             "given. Times on a shared 2-core CPU (noisy).", "",
             "| variant | ranks from | MACs ratio | test top-1 | after fine-tune | compress time (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, allocation, ratio, accuracy, tuned, seconds in rows:
        lines.append(f"| {name} | {allocation} | {ratio:.3f} | {accuracy:.4f} | "
                     f"{'-' if tuned is None else f'{tuned:.4f}'} | {seconds:.1f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with atomic_path(args.out) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(args, rows)


def plot(args: argparse.Namespace, rows: list[tuple]) -> None:
    """Accuracy against MACs ratio, one marker per variant and allocation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    colours = {variant: f"C{index}" for index, variant in enumerate(["original", *VARIANTS])}
    for name, allocation, ratio, accuracy, _, _ in rows:
        variant = name.split(" (")[0]
        label = variant + ("" if allocation == "-" else f", {allocation}")
        marker = {"flops_target": "o", "compress_ratio": "s"}.get(allocation, "*")
        axes.scatter(ratio, accuracy, marker=marker, color=colours[variant], label=label)
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes.legend(unique.values(), unique.keys(), fontsize=7)
    axes.set_xlabel("MACs / original")
    axes.set_ylabel("test top-1, no fine-tuning")
    axes.set_title(f"low-rank decomposition: {args.model} on {args.data}")
    path = os.path.splitext(args.out)[0] + ".png"
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, bbox_inches="tight", format="png")
    plt.close(figure)


if __name__ == "__main__":
    main()
