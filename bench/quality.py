"""Quality benchmark: accuracy kept by each compressor at the same MACs, before and after the same short fine-tuning.

Networks (ResNet-20, a small VGG and the residual + concat CNN of ``amc.models``) are trained on a subset of
Fashion-MNIST (checkpoints cached in ``~/.cache/amc-bench``, outside git), then compressed to 2x and 3x fewer MACs
by every method in :data:`METHODS`: ChannelPruning, LowRankDecomposition (weight SVD, data-driven, nonlinear), our
L1 (with and without BatchNorm recalibration), random, our iterative Taylor pruning, and Torch-Pruning 1.6's
MetaPruner with its magnitude and Taylor importances, brought to the same MACs by bisecting its ratio. Each is
evaluated on the test split without fine-tuning and after one epoch of the same fine-tuning
(:func:`trainers.finetune`, labels only); the compression time is measured. A last section times
ChannelPruning on a VGG-16-size network on 32x32 inputs. Unstructured magnitude pruning (one-shot against Zhu &
Gupta's gradual schedule during the same fine-tuning) is reported as accuracy against sparsity.

``python bench/quality.py`` writes ``bench/results/quality.md`` and ``quality.png``. Not a test.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from amc.models import SmallVGG, build_model  # noqa: E402
from bench.zoo import ROOT, write_atomically  # noqa: E402
from compressors.base import batch_inputs, recalibrate_batchnorm, top1_accuracy  # noqa: E402
from graph import capture  # noqa: E402
from graph.network import ReconstructedNetwork  # noqa: E402
from graph.pruning import multiply_adds, prune  # noqa: E402
from trainers import finetune  # noqa: E402
from trainers.datasets import DataSplits, load_dataset  # noqa: E402

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "amc-bench")
Method = Callable[[ReconstructedNetwork, nn.Module, DataSplits, float, argparse.Namespace], nn.Module]


# ------------------------------------------------------------------------------------------------ methods
def _channel_pruning(origin: ReconstructedNetwork, model: nn.Module, data: DataSplits, target: float,
                     args: argparse.Namespace) -> nn.Module:
    from compressors import ChannelPruning

    return ChannelPruning(origin, data.train, trainset_ratio=args.calibration_ratio, flops_target=target).compress()


def _low_rank(method: str, nonlinear: bool = False) -> Method:
    def run(origin: ReconstructedNetwork, model: nn.Module, data: DataSplits, target: float,
            args: argparse.Namespace) -> nn.Module:
        from compressors import LowRankDecomposition

        return LowRankDecomposition(origin, data.train, trainset_ratio=args.calibration_ratio, flops_target=target,
                                    method=method, nonlinear_case=nonlinear).compress()

    return run


def _weight_norm(importance: str, recalibrate: bool) -> Method:
    def run(origin: ReconstructedNetwork, model: nn.Module, data: DataSplits, target: float,
            args: argparse.Namespace) -> nn.Module:
        pruned = prune(origin, flops_target=target, importance=importance)
        if recalibrate:
            recalibrate_batchnorm(pruned, _calibration_inputs(data, args))
        return pruned

    return run


def _torch_pruning(importance: str) -> Method:
    """Torch-Pruning 1.6's MetaPruner with its ``magnitude`` (L2 group magnitude) or ``taylor`` importance (gradients
    of the cross-entropy over the calibration batches) on a copy of the user's model, final Linear ignored, its
    uniform ratio bisected until our MACs count is at most the target."""

    def run(origin: ReconstructedNetwork, model: nn.Module, data: DataSplits, target: float,
            args: argparse.Namespace) -> nn.Module:
        import torch_pruning as tp

        example = next(iter(data.test))[0][:1]
        budget = multiply_adds(origin) * target

        def pruned_at(ratio: float) -> nn.Module:
            copy_ = copy.deepcopy(model).eval()
            last = [m for m in copy_.modules() if isinstance(m, nn.Linear)][-1]
            scorer = (tp.importance.TaylorImportance() if importance == "taylor"
                      else tp.importance.MagnitudeImportance(p=2))
            pruner = tp.pruner.MetaPruner(copy_, example, importance=scorer, pruning_ratio=ratio,
                                          ignored_layers=[last])
            if importance == "taylor":
                copy_.zero_grad()
                for index, (images, labels) in enumerate(data.train):
                    if index >= args.taylor_batches:
                        break
                    F.cross_entropy(copy_(images), labels).backward()
            pruner.step()
            return copy_

        low, high, best = 0.0, 0.95, None
        for _ in range(10):
            ratio = (low + high) / 2
            candidate = pruned_at(ratio)
            if multiply_adds(capture(candidate, example)) <= budget:
                best, high = candidate, ratio
            else:
                low = ratio
        if best is None:
            raise RuntimeError("Torch-Pruning could not reach the MACs target")
        return best

    return run


def _taylor(normalize: str | None) -> Method:
    """Our TaylorPruning with per-group ``normalize``: ``--taylor-rounds`` rounds of global Taylor ranking to the
    MACs target, without fine-tuning between rounds (every method gets the same fine-tuning afterwards)."""
    def run(origin: ReconstructedNetwork, model: nn.Module, data: DataSplits, target: float,
            args: argparse.Namespace) -> nn.Module:
        from compressors import TaylorPruning

        return TaylorPruning(origin, data.train, flops_target=target, steps=args.taylor_rounds, finetune_steps=0,
                             taylor_batches=args.taylor_batches, normalize=normalize).compress()

    return run


METHODS: dict[str, Method] = {
    "ChannelPruning (LASSO + LS)": _channel_pruning,
    "low-rank, weight SVD": _low_rank("weight"),
    "low-rank, data-driven": _low_rank("data"),
    "low-rank, nonlinear": _low_rank("data", nonlinear=True),
    "our L1": _weight_norm("l1", recalibrate=False),
    "our L1 + BN recalibration": _weight_norm("l1", recalibrate=True),
    "random": _weight_norm("random", recalibrate=False),
    "Taylor (ours)": _taylor(None),
    "Taylor (ours, L2-normalised)": _taylor("l2"),
    "Taylor (ours, RMS-normalised)": _taylor("rms"),
    "Torch-Pruning 1.6 magnitude": _torch_pruning("magnitude"),
    "Torch-Pruning 1.6 Taylor": _torch_pruning("taylor"),
}


# ------------------------------------------------------------------------------------------------ pieces
def _calibration_inputs(data: DataSplits, args: argparse.Namespace):
    count = max(1, int(len(data.train) * args.calibration_ratio))
    for index, batch in enumerate(data.train):
        if index >= count:
            break
        yield batch_inputs(batch)


def trained(name: str, data: DataSplits, args: argparse.Namespace) -> nn.Module:
    """The network ``name`` trained on the benchmark's data, from the cache when it was trained alike before."""
    torch.manual_seed(0)
    model = build_model(name, data.input_shape[0], data.num_classes)
    path = os.path.join(CACHE, f"{name}-fashion-mnist-{args.train_limit}-{args.train_epochs}ep.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        started = time.perf_counter()
        finetune(model, data.train, epochs=args.train_epochs, lr=0.05)
        print(f"trained {name} in {time.perf_counter() - started:.0f} s")
        os.makedirs(CACHE, exist_ok=True)
        torch.save(model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
    return model.eval()


def _same_finetuning_order(args: argparse.Namespace) -> None:
    """Reset the fine-tuning loader's shuffle and the global RNG, so every method is fine-tuned on the same batches
    in the same order, whatever the methods before it drew."""
    args.finetune_loader.generator.manual_seed(0)
    torch.manual_seed(0)


def evaluate_method(method: str, origin: ReconstructedNetwork, model: nn.Module, data: DataSplits, speedup: float,
                    args: argparse.Namespace) -> dict[str, Any]:
    """Compress, measure MACs, accuracy, time; fine-tune one epoch and measure again."""
    torch.manual_seed(0)
    started = time.perf_counter()
    try:
        network = METHODS[method](origin, model, data, 1 / speedup, args)
    except Exception as error:  # noqa: BLE001 - a failing method is a result
        return {"method": method, "speedup": speedup, "error": f"{type(error).__name__}: {error}"}
    seconds = time.perf_counter() - started
    example = next(iter(data.test))[0][:1]
    macs = multiply_adds(network if isinstance(network, ReconstructedNetwork) else capture(network.eval(), example))
    row = {"method": method, "speedup": speedup, "seconds": seconds, "macs_ratio": macs / multiply_adds(origin),
           "params_ratio": sum(p.numel() for p in network.parameters()) / sum(p.numel() for p in origin.parameters()),
           "top1": top1_accuracy(network, data.test)}
    _same_finetuning_order(args)
    finetune(network, args.finetune_loader, epochs=args.finetune_epochs, lr=0.01)
    row["top1_finetuned"] = top1_accuracy(network.eval(), data.test)
    print(f"  {method:32s} {speedup:.0f}x  MACs {row['macs_ratio']:.3f}  top-1 {row['top1']:.4f} -> "
          f"{row['top1_finetuned']:.4f}  ({seconds:.1f} s)", flush=True)
    return row


def sparsity_rows(origin: ReconstructedNetwork, data: DataSplits, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Unstructured L1 magnitude pruning at each of ``--sparsities``: one-shot (masks, then the fine-tuning epoch)
    against gradual (Zhu & Gupta's cubic schedule rising to the sparsity over the first three quarters of the same
    fine-tuning steps); test accuracy before and after, and the sparsity the masks really have."""
    from compressors import MagnitudePruning
    from compressors.schedules import CubicSchedule, GradualPruning
    from compressors.sparsity_report import sparsity_report

    steps = len(args.finetune_loader) * args.finetune_epochs
    rows = []
    for sparsity in args.sparsities:
        for mode in ("one-shot", "gradual (cubic)"):
            torch.manual_seed(0)
            pruner = MagnitudePruning(origin, data.train, sparsity=sparsity)
            if mode == "one-shot":
                network, callbacks = pruner.compress(), []
            else:
                network = copy.deepcopy(pruner.origin_net)
                schedule = CubicSchedule(0, max(1, 3 * steps // 4), frequency=max(1, steps // 20))
                callbacks = [GradualPruning(pruner, network, schedule)]
            row = {"mode": mode, "sparsity": sparsity, "top1": top1_accuracy(network, data.test)}
            _same_finetuning_order(args)
            finetune(network, args.finetune_loader, epochs=args.finetune_epochs, lr=0.01, callbacks=callbacks)
            row.update(top1_finetuned=top1_accuracy(network.eval(), data.test),
                       measured=sparsity_report(network).sparsity)
            print(f"  magnitude {mode:16s} sparsity {row['measured']:.3f}  top-1 {row['top1']:.4f} -> "
                  f"{row['top1_finetuned']:.4f}", flush=True)
            rows.append(row)
    return rows


def vgg16_timing(args: argparse.Namespace) -> dict[str, Any]:
    """ChannelPruning of a CIFAR-style VGG-16 (13 conv-BN-ReLU, 512-wide head, 15M parameters) to half its MACs on
    Fashion-MNIST images padded to 32x32; random weights (only the time is measured)."""
    from compressors import ChannelPruning

    torch.manual_seed(0)
    widths = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
    model = SmallVGG(1, 10, widths=widths, hidden=512).eval()
    data = load_dataset("fashion-mnist", batch_size=64, train_limit=args.vgg16_images)
    images = torch.cat([F.pad(x, (2, 2, 2, 2)) for x, _ in data.train])
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=64)
    started, cpu_started = time.perf_counter(), time.process_time()
    compressor = ChannelPruning(model, loader, flops_target=0.5)
    compressed = compressor.compress()
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
            "images": len(images),
            "params": sum(p.numel() for p in model.parameters()),
            "macs_ratio": multiply_adds(compressed) / multiply_adds(compressor.origin_net),
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------ report
def report(results: dict[str, dict[str, Any]], vgg16: dict[str, Any] | None, args: argparse.Namespace,
           total_seconds: float) -> str:
    lines = ["# Quality: accuracy kept at the same MACs", "",
             f"`python bench/quality.py {' '.join(sys.argv[1:])}`".replace("  ", " "), "",
             f"Fashion-MNIST, networks trained on {args.train_limit} training images for {args.train_epochs} epochs "
             f"(cached in `~/.cache/amc-bench`); test accuracy on {args.test_limit} test images; calibration data "
             f"for the data-driven methods: {args.calibration_ratio:.0%} of the training batches; fine-tuning: "
             f"{args.finetune_epochs} epoch over {args.finetune_limit} training images, SGD (lr 0.01, cosine) on "
             "labels, the same for every method (the same batches in the same order). "
             f"MACs ratios by our counter on the compressed network. Times are wall-clock on a 2-core machine "
             f"shared with other jobs (noisy). Whole run: {total_seconds / 60:.1f} min.", ""]
    for name, result in results.items():
        lines += [f"## {name}: original test top-1 {result['original_top1']:.4f}, "
                  f"{result['original_macs'] / 1e6:.1f} M MACs", "",
                  "| method | speedup | MACs ratio | params ratio | top-1, no fine-tuning | top-1, 1 epoch fine-tuning "
                  "| compression time (s) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in result["rows"]:
            if "error" in row:
                lines.append(f"| {row['method']} | {row['speedup']:.0f}x | failed: {row['error'][:100]} | | | | |")
                continue
            lines.append(f"| {row['method']} | {row['speedup']:.0f}x | {row['macs_ratio']:.3f} | "
                         f"{row['params_ratio']:.3f} | {row['top1']:.4f} | {row['top1_finetuned']:.4f} | "
                         f"{row['seconds']:.1f} |")
        lines.append("")
        if result.get("sparsity_rows"):
            lines += [f"### {name}: unstructured magnitude pruning (accuracy against sparsity)", "",
                      "Conv and Linear weights, L1, local; the same fine-tuning as above. One-shot prunes first; "
                      "gradual raises the sparsity along the cubic schedule during the fine-tuning (its 'no "
                      "fine-tuning' column is the dense network). Sparsity does not reduce MACs.", "",
                      "| schedule | sparsity asked | sparsity measured | top-1, no fine-tuning | top-1, fine-tuned |",
                      "| --- | --- | --- | --- | --- |"]
            lines += [f"| {row['mode']} | {row['sparsity']:.2f} | {row['measured']:.3f} | {row['top1']:.4f} | "
                      f"{row['top1_finetuned']:.4f} |" for row in result["sparsity_rows"]]
            lines.append("")
    if vgg16:
        lines += ["## ChannelPruning time on a VGG-16-size network", "",
                  f"CIFAR-style VGG-16 ({vgg16['params'] / 1e6:.1f} M parameters), 32x32 inputs, "
                  f"{vgg16['images']} calibration images, 10 positions per image and layer, half the MACs "
                  f"(reached: {vgg16['macs_ratio']:.3f}): **{vgg16['seconds']:.0f} s** wall-clock with "
                  f"{vgg16['threads']} torch threads, {vgg16['cpu_seconds']:.0f} s of CPU time summed over threads "
                  "(goal: under 10 minutes on 2 cores; on a shared machine the CPU time is the fairer figure).", ""]
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: str) -> str:
    """Accuracy against MACs ratio per network, without (top row) and after fine-tuning (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 8), squeeze=False)
    markers = dict(zip(METHODS, "os^vDdxP*hX<>"))
    for column, (name, result) in enumerate(results.items()):
        for row_index, (key, title) in enumerate((("top1", "no fine-tuning"), ("top1_finetuned", "1 epoch"))):
            axis = axes[row_index][column]
            for method in METHODS:
                rows = sorted((r for r in result["rows"] if r["method"] == method and "error" not in r),
                              key=lambda r: r["macs_ratio"])
                if rows:
                    axis.plot([r["macs_ratio"] for r in rows], [r[key] for r in rows], marker=markers[method],
                              label=method)
            axis.axhline(result["original_top1"], color="gray", linestyle="--", label="original")
            axis.set_title(f"{name}, {title}")
            axis.set_xlabel("MACs ratio (compressed / original)")
            axis.set_ylabel("test top-1")
            axis.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    temporary = path + ".tmp.png"
    figure.savefig(temporary, dpi=110)
    os.replace(temporary, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="*", default=["resnet20", "vgg-small"],
                        help="built-in networks (none: only the VGG-16 timing)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--speedups", nargs="+", type=float, default=[2.0, 3.0])
    parser.add_argument("--train-limit", type=int, default=3000, help="training images the networks are trained on")
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--finetune-limit", type=int, default=1000, help="training images of the fine-tuning epoch")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--calibration-ratio", type=float, default=0.25)
    parser.add_argument("--taylor-batches", type=int, default=8, help="training batches Taylor importances use")
    parser.add_argument("--taylor-rounds", type=int, default=3, help="rounds of our iterative Taylor pruning")
    parser.add_argument("--sparsities", nargs="*", type=float, default=[0.5, 0.8, 0.9],
                        help="unstructured magnitude pruning rows (none: skip them)")
    parser.add_argument("--vgg16-images", type=int, default=512, help="calibration images of the VGG-16 timing "
                                                                      "(0 skips it)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "quality.md"))
    args = parser.parse_args()
    started = time.perf_counter()
    data = load_dataset("fashion-mnist", batch_size=64, train_limit=args.train_limit, test_limit=args.test_limit)
    subset = Subset(data.train.dataset, range(min(args.finetune_limit, len(data.train.dataset))))
    args.finetune_loader = DataLoader(subset, batch_size=64, shuffle=True,
                                      generator=torch.Generator().manual_seed(0))
    results = {}
    for name in args.networks:
        model = trained(name, data, args)
        origin = capture(model, next(iter(data.test))[0][:1])
        results[name] = {"original_top1": top1_accuracy(origin, data.test), "original_macs": multiply_adds(origin),
                         "rows": []}
        print(f"{name}: original top-1 {results[name]['original_top1']:.4f}", flush=True)
        for speedup in args.speedups:
            for method in args.methods:
                results[name]["rows"].append(evaluate_method(method, origin, model, data, speedup, args))
                write_atomically(args.out, report(results, None, args, time.perf_counter() - started) + "\n")
        results[name]["sparsity_rows"] = sparsity_rows(origin, data, args)
    vgg16 = vgg16_timing(args) if args.vgg16_images else None
    text = report(results, vgg16, args, time.perf_counter() - started)
    write_atomically(args.out, text + "\n")
    print(text)
    if results:
        print(f"plot: {plot(results, os.path.splitext(args.out)[0] + '.png')}")


if __name__ == "__main__":
    main()
