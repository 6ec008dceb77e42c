"""Benchmark the ratio search: per-layer preserve ratios found by DDPG and the GA against a uniform ratio, random
search with the same number of evaluations, and a one-shot sensitivity allocator, at equal MACs.

ResNet-20 and the MobileNet-V2-style network of ``amc/models.py`` are trained briefly on Fashion-MNIST (28x28,
``--train-steps`` SGD steps through ``trainers.finetune``; cached in ``--cache``), then compressed to each
``--targets`` fraction of their MACs with each ``--compressors`` action (``l2``: L2-norm channel pruning;
``taylor``: channels ranked by Taylor importance; ``channel-pruning``: LASSO selection + least-squares refit;
``low-rank`` / ``low-rank-weight``: per-layer ranks, data-driven or weight SVD). Every method gets the same ``--episodes`` policy
evaluations (the sensitivity allocator uses what its table needs), rewards on ``--heldout`` images of the held-out
split of the *training* data, BatchNorm re-estimation on ``--calibration`` training images. Reported per row: MACs
counted on the compressed network, held-out (reward images) and test accuracy (first ``--test-limit`` test images)
without fine-tuning and after the same ``--finetune-steps`` steps of ``trainers.finetune``, distinct evaluations,
search seconds. The machine is shared: timings are noisy, and ``OMP_NUM_THREADS``/torch threads are 1.

Run ``python bench/search.py`` (``--help`` for the settings); rows are cached in ``--cache`` so an interrupted run
continues; the table goes to ``bench/results/search.md`` and the per-layer ratios to ``bench/results/search.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from amc.models import build_model  # noqa: E402
from compressors.base import top1_accuracy  # noqa: E402
from graph.serialization.atomic import atomic_path  # noqa: E402
from trainers import finetune  # noqa: E402
from trainers.datasets import load_dataset  # noqa: E402

MODELS = ("resnet20", "mobilenet-v2-small")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "amc-compress", "bench-search")
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "search.md")


def trained_model(name: str, data, steps: int, cache: str) -> torch.nn.Module:
    """The built-in network ``name`` trained ``steps`` SGD steps on the training split (cached by name and steps)."""
    path = os.path.join(cache, f"{name}-{steps}.pt")
    torch.manual_seed(0)
    model = build_model(name, 1, data.num_classes)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    started = time.perf_counter()
    finetune(model, data.train, epochs=1, max_steps=steps, lr=0.05, verbose=True)
    print(f"trained {name} for {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    with atomic_path(path) as temporary:
        torch.save(model.state_dict(), temporary)
    return model.eval()


METHODS = ("uniform", "random", "sensitivity", "ddpg", "ga")


def tuner_for(method: str, model, data, target: float, compressor: str, args):
    """The tuner of ``method`` with the benchmark's shared settings (uniform uses a random tuner's setup)."""
    from compressors.tuners import DDPGTuner, GATuner
    from compressors.tuners.random_search import RandomSearchTuner
    from compressors.tuners.sensitivity import SensitivityTuner

    common = dict(flops_target=target, compressor=compressor, episodes=args.episodes, seed=args.seed,
                  round_to=args.round_to, heldout_images=args.heldout, calibration_images=args.calibration,
                  verbose=args.verbose)
    if method == "ddpg":
        return DDPGTuner(model, data.train, data.val, warmup=max(1, args.episodes // 3), **common)
    if method == "ga":
        return GATuner(model, data.train, data.val, population=args.population, **common)
    if method == "sensitivity":
        return SensitivityTuner(model, data.train, data.val, **common)
    return RandomSearchTuner(model, data.train, data.val, **common)


def run_method(method: str, model, data, target: float, compressor: str, args) -> dict[str, Any]:
    """Search (or take the uniform policy), then measure the compressed network before and after fine-tuning."""
    started = time.perf_counter()
    tuner = tuner_for(method, model, data, target, compressor, args)
    setup = time.perf_counter() - started
    if method == "uniform":
        keeps = tuner.uniform_keeps()
        tuner.record(tuner.scorer.score(0, keeps), checkpoint=False)
        tuner.elapsed = time.perf_counter() - started - setup
        result = tuner.result()
    else:
        result = tuner.search()
    network = result.compressed_net
    test_before = top1_accuracy(network, data.test)
    finetune(network, data.train, epochs=1, max_steps=args.finetune_steps, lr=0.01)
    heldout_after = top1_accuracy(network, data.val, limit=args.heldout)
    row = {"model": args.model_name, "target": target, "compressor": compressor, "method": method,
           "macs_ratio": result.macs_ratio, "heldout": result.accuracy, "test": test_before,
           "heldout_ft": heldout_after, "test_ft": top1_accuracy(network, data.test),
           "evaluations": result.evaluations, "episodes": len(result.history), "seconds": result.seconds,
           "setup_seconds": setup, "seconds_per_episode": result.seconds / max(len(result.history), 1),
           "original_heldout": result.original_accuracy, "ratios": result.ratios}
    return row


def time_ddpg(model, data, args) -> dict[str, Any]:
    """Wall and CPU seconds per DDPG episode on ResNet-20 at the paper's budget of 300 episodes' settings (rewards on
    ``--heldout`` images, BatchNorm re-estimation on ``--calibration``), and the 300-episode extrapolation."""
    from compressors.tuners import DDPGTuner

    tuner = DDPGTuner(model, data.train, data.val, flops_target=0.5, episodes=args.timing_episodes,
                      warmup=args.timing_episodes // 2, round_to=args.round_to, heldout_images=args.heldout,
                      calibration_images=args.calibration, seed=args.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    tuner.search()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    episodes = args.timing_episodes
    return {"episodes": episodes, "wall_per_episode": wall / episodes, "cpu_per_episode": cpu / episodes,
            "wall_300_minutes": 300 * wall / episodes / 60, "cpu_300_minutes": 300 * cpu / episodes / 60}


def load_rows(path: str) -> Any:
    """Rows (or timings) finished by earlier runs."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def save_rows(path: str, rows: Any) -> None:
    """Write the rows atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)


def table(rows: list[dict[str, Any]], originals: dict[str, dict[str, float]], timings: dict[str, Any],
          args) -> str:
    """The markdown report."""
    lines = ["# Ratio search: uniform vs random vs sensitivity vs DDPG vs GA at equal MACs", "",
             f"Fashion-MNIST 28x28; base models trained {args.train_steps} SGD steps (batch 64); reward on the first "
             f"{args.heldout} images of the held-out split of the training data; BatchNorm re-estimated on "
             f"{args.calibration} training images; round_to={args.round_to}; {args.episodes} evaluations per "
             f"search method (GA population {args.population}; DDPG warm-up {max(1, args.episodes // 3)}); "
             f"fine-tuning {args.finetune_steps} SGD steps (lr 0.01, cosine) for every row; test = first "
             f"{args.test_limit} test images. One process, 1 thread, on a machine shared with other jobs: seconds "
             f"are noisy. {args.note}".rstrip(), "",
             "| model | MACs target | compressor | method | MACs kept | held-out | test | held-out FT | test FT | "
             "evaluations | search s | s/episode |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, original in originals.items():
        lines.append(f"| {name} | 1.0 | - | original | 1.000 | {original['heldout']:.4f} | {original['test']:.4f} "
                     "| - | - | - | - | - |")
    for row in rows:
        lines.append(f"| {row['model']} | {row['target']} | {row['compressor']} | {row['method']} | "
                     f"{row['macs_ratio']:.3f} | {row['heldout']:.4f} | {row['test']:.4f} | {row['heldout_ft']:.4f} | "
                     f"{row['test_ft']:.4f} | {row['evaluations']} | {row['seconds']:.0f} | "
                     f"{row['seconds_per_episode']:.2f} |")
    if timings:
        lines += ["", "DDPG on ResNet-20 (0.5 of the MACs), time per episode (evaluation and agent updates, no "
                  "checkpointing), 300 episodes extrapolated; CPU seconds are what one idle core would take:",
                  "", "| reward images + calibration images | episodes timed | wall s/episode | CPU s/episode | "
                  "300 episodes wall (min) | 300 episodes CPU (min) |", "| --- | --- | --- | --- | --- | --- |"]
        for key, timing in timings.items():
            lines.append(f"| {key} | {timing['episodes']} | {timing['wall_per_episode']:.2f} | "
                         f"{timing['cpu_per_episode']:.2f} | {timing['wall_300_minutes']:.1f} | "
                         f"{timing['cpu_300_minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Per-layer preserve ratios of every method, one panel per (model, target, compressor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["target"], r["compressor"]) for r in rows))
    if not panels:
        return
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for axis, key in zip(axes[:, 0], panels):
        for row in (r for r in rows if (r["model"], r["target"], r["compressor"]) == key):
            axis.plot(range(len(row["ratios"])), list(row["ratios"].values()), marker="o",
                      label=f"{row['method']} (test {row['test']:.3f})")
        names = list(next(r for r in rows if (r["model"], r["target"], r["compressor"]) == key)["ratios"])
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(names, rotation=60, ha="right", fontsize=6)
        axis.set_ylabel("preserve ratio")
        axis.set_ylim(0, 1.05)
        axis.set_title(f"{key[0]}, {key[1]} of the MACs, {key[2]}")
        axis.legend(fontsize=7, ncol=3)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--compressors", nargs="+", default=["l2"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--episodes", type=int, default=60, help="policy evaluations per search method")
    parser.add_argument("--population", type=int, default=10)
    parser.add_argument("--round-to", type=int, default=None)
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--only-train", action="store_true",
                        help="train (and cache) the base models (and time DDPG with --timing-episodes), then stop")
    parser.add_argument("--report-only", action="store_true",
                        help="only write the table and plot from the rows already in --cache")
    parser.add_argument("--note", default="", help="a sentence added to the report's header")
    parser.add_argument("--timing-episodes", type=int, default=0,
                        help="also time this many DDPG episodes on ResNet-20 (wall and CPU seconds per episode)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.cache, exist_ok=True)
    data = load_dataset("fashion-mnist", batch_size=64, test_limit=args.test_limit)
    rows_path = os.path.join(args.cache, "rows.json")
    rows = load_rows(rows_path)
    originals = {}
    for name in args.models:
        model = trained_model(name, data, args.train_steps, args.cache)
        originals[name] = {"heldout": top1_accuracy(model, data.val, limit=args.heldout),
                           "test": top1_accuracy(model, data.test)}
        print(name, originals[name], flush=True)
        timings = load_rows(os.path.join(args.cache, "timing.json")) or {}
        key = f"{args.heldout} + {args.calibration}"
        if args.timing_episodes and name == "resnet20" and key not in timings:
            timings[key] = time_ddpg(model, data, args)
            print("timing", timings[key], flush=True)
            save_rows(os.path.join(args.cache, "timing.json"), timings)
        if args.only_train or args.report_only:
            continue
        args.model_name = name
        for target in args.targets:
            for compressor in args.compressors:
                for method in args.methods:
                    key = (name, target, compressor, method)
                    if any((r["model"], r["target"], r["compressor"], r["method"]) == key for r in rows):
                        continue
                    row = run_method(method, model, data, target, compressor, args)
                    rows.append(row)
                    save_rows(rows_path, rows)
                    print({k: v for k, v in row.items() if k != "ratios"}, flush=True)
    report = table(rows, originals, load_rows(os.path.join(args.cache, "timing.json")) or {}, args)
    print(report)
    with atomic_path(args.out) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(report)
    plot(rows, os.path.splitext(args.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
