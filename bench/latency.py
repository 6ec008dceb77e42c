"""Benchmark CPU latency of pruned networks: does removing half the multiply-adds make a network faster?

For each model (torchvision resnet50, mobilenet_v2 and vgg16 at 224x224, the 4-level UNet of ``amc/models.py`` at
256x256; random weights, eval mode) the network is captured at batch 1 and pruned with
``graph.prune(rnet, flops_target=0.5, importance="l2", round_to=r)`` for r in None, 8 and 16. Then, at every batch
size, the latency of the unpruned and pruned networks is measured side by side:

* torch eager: the original torchvision module, the captured unpruned ``ReconstructedNetwork`` (their difference is
  the replay overhead) and each pruned network, under ``torch.no_grad``;
* onnxruntime: the unpruned and each pruned network exported with ``rnet.export_onnx`` and run with the
  ``CPUExecutionProvider``.

Within one (model, backend, batch) cell every variant gets a warm-up, then the variants are timed round-robin (the
starting variant rotates every repeat) so machine noise hits all of them alike; each sample runs enough calls to last
``--min-sample`` seconds. The latency ratio is the median of the per-repeat ratios pruned / unpruned-captured, and
``latency cut / MACs cut = (1 - latency ratio) / (1 - MACs ratio)``: 1 means the time fell exactly as much as the
arithmetic. ``torch.set_num_threads`` and onnxruntime's ``intra_op_num_threads`` are both ``--threads``.

Run ``python bench/latency.py`` (``--help`` for subsets and settings); the table is printed and written to
``bench/results/latency.md``.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision  # noqa: E402
from tqdm import tqdm  # noqa: E402

from amc.models import UNet  # noqa: E402
from graph import capture, prune  # noqa: E402
from graph.pruning import multiply_adds  # noqa: E402
from graph.serialization.atomic import atomic_path  # noqa: E402

MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), 224),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), 224),
    "vgg16": (lambda: torchvision.models.vgg16(weights=None), 224),
    "unet": (UNet, 256),
}
ROUND_TOS: tuple[int | None, ...] = (None, 8, 16)
BACKENDS = ("torch", "onnxruntime")
FLOPS_TARGET = 0.5
DIVISOR = 8
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "latency.md")
TORCHVISION, UNPRUNED = "torchvision", "unpruned"


@dataclass
class Variant:
    """One network to time: its label (``torchvision``, ``unpruned`` or ``round_to=r``), MACs and figures."""

    label: str
    network: nn.Module | None
    macs: int
    params: int
    divisible: float
    prune_s: float = 0.0
    onnx_path: str | None = None


@dataclass
class Cell:
    """Per-variant latency samples (seconds per call) of one (model, backend, batch) measurement."""

    model: str
    backend: str
    batch: int
    samples: dict[str, list[float]] = field(default_factory=dict)

    def median_s(self, label: str) -> float:
        """Median seconds per call of ``label``."""
        return statistics.median(self.samples[label])

    def ratio(self, label: str, baseline: str = UNPRUNED) -> float:
        """Median over repeats of ``label``'s time over ``baseline``'s time in the same repeat."""
        return statistics.median(a / b for a, b in zip(self.samples[label], self.samples[baseline]))


def divisible_fraction(module: nn.Module, divisor: int = DIVISOR) -> float:
    """Fraction of the conv / transposed-conv / linear layers whose output width is a multiple of ``divisor``."""
    widths = [m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
              for m in module.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    return sum(w % divisor == 0 for w in widths) / max(1, len(widths))


def _variant(label: str, network: nn.Module, macs: int, prune_s: float = 0.0) -> Variant:
    params = sum(p.numel() for p in network.parameters())
    return Variant(label, network, macs, params, divisible_fraction(network), prune_s)


def prepare(name: str, round_tos: tuple[int | None, ...]) -> tuple[list[Variant], int]:
    """The torchvision module, its capture and its pruned versions (all eval mode), and the input side."""
    build, side = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        rnet = capture(model, torch.randn(1, 3, side, side))
        macs = multiply_adds(rnet)
        variants = [_variant(TORCHVISION, model, macs), _variant(UNPRUNED, rnet, macs)]
        for round_to in round_tos:
            start = time.perf_counter()
            pruned = prune(rnet, flops_target=FLOPS_TARGET, importance="l2", round_to=round_to).eval()
            variants.append(_variant(f"round_to={round_to}", pruned, multiply_adds(pruned),
                                     time.perf_counter() - start))
    return variants, side


def export_all(variants: list[Variant], side: int, directory: str) -> None:
    """Export every captured variant to ``directory`` (dynamic batch) and record the paths."""
    example = torch.randn(1, 3, side, side)
    for variant in variants:
        if variant.label != TORCHVISION:
            variant.onnx_path = variant.network.export_onnx(
                os.path.join(directory, f"{variant.label.replace('=', '_')}.onnx"), example)


def ort_runner(path: str, threads: int, x: torch.Tensor) -> Callable[[], Any]:
    """A zero-argument function running the ONNX model at ``path`` on ``x`` with ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def torch_runner(network: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """A zero-argument function running ``network`` on ``x`` without autograd."""
    def run() -> Any:
        with torch.no_grad():
            return network(x)
    return run


def time_round_robin(runners: dict[str, Callable[[], Any]], repeats: int, min_sample: float,
                     clock: Callable[[], float], progress: tqdm) -> dict[str, list[float]]:
    """Seconds per call of every runner: one warm-up call each, then ``repeats`` rounds timing each runner once,
    starting from a different runner every round; a sample averages enough calls for the first runner's time to
    reach ``min_sample`` seconds (the same call count for all runners)."""
    labels = list(runners)
    for label in labels:
        runners[label]()
    start = clock()
    runners[labels[0]]()
    calls = max(1, math.ceil(min_sample / max(clock() - start, 1e-9)))
    samples: dict[str, list[float]] = {label: [] for label in labels}
    for repeat in range(repeats):
        for offset in range(len(labels)):
            label = labels[(repeat + offset) % len(labels)]
            start = clock()
            for _ in range(calls):
                runners[label]()
            samples[label].append((clock() - start) / calls)
        progress.update(1)
    return samples


def measure_cell(name: str, backend: str, batch: int, variants: list[Variant], side: int, args: argparse.Namespace,
                 clock: Callable[[], float], progress: tqdm) -> Cell:
    """Time every variant of ``name`` on one backend at one batch size."""
    progress.set_description(f"{name} {backend} b{batch}")
    x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))
    if backend == "torch":
        runners = {v.label: torch_runner(v.network, x) for v in variants}
    else:
        runners = {v.label: ort_runner(v.onnx_path, args.threads, x) for v in variants if v.onnx_path}
    return Cell(name, backend, batch, time_round_robin(runners, args.repeats, args.min_sample, clock, progress))


def cut_ratio(latency_ratio: float, macs_ratio: float) -> float:
    """``(1 - latency ratio) / (1 - MACs ratio)``: the share of the MACs cut that shows up as a latency cut."""
    return (1 - latency_ratio) / (1 - macs_ratio) if macs_ratio < 1 else float("nan")


def _find(group: list[Variant], label: str) -> Variant:
    return next(v for v in group if v.label == label)


def _rows(cells: list[Cell], variants: dict[str, list[Variant]]) -> list[str]:
    rows = []
    for cell in cells:
        unpruned = _find(variants[cell.model], UNPRUNED)
        for variant in variants[cell.model]:
            if variant.label in (TORCHVISION, UNPRUNED):
                continue
            macs_ratio, latency_ratio = variant.macs / unpruned.macs, cell.ratio(variant.label)
            versus_module = (f"{cell.ratio(variant.label, TORCHVISION):.3f}" if TORCHVISION in cell.samples
                             else "-")
            rows.append(f"| {cell.model} | {variant.label.split('=')[1]} | {cell.backend} | {cell.batch} | "
                        f"{macs_ratio:.3f} | {variant.divisible:.2f} | {cell.median_s(UNPRUNED) * 1e3:.1f} | "
                        f"{cell.median_s(variant.label) * 1e3:.1f} | {latency_ratio:.3f} | "
                        f"**{cut_ratio(latency_ratio, macs_ratio):.2f}** | {versus_module} |")
    return rows


def _summary(cells: list[Cell], variants: dict[str, list[Variant]], round_tos: tuple[int | None, ...]) -> list[str]:
    lines = []
    for round_to in round_tos:
        label = f"round_to={round_to}"
        for backend in BACKENDS:
            cuts = []
            for cell in (c for c in cells if c.backend == backend and label in c.samples):
                macs_ratio = _find(variants[cell.model], label).macs / _find(variants[cell.model], UNPRUNED).macs
                cuts.append(cut_ratio(cell.ratio(label), macs_ratio))
            if cuts:
                lines.append(f"- `round_to={round_to}`, {backend}: latency cut / MACs cut median "
                             f"**{statistics.median(cuts):.2f}**, min {min(cuts):.2f} over {len(cuts)} "
                             "(model, batch) cells")
    return lines


def _overhead_rows(cells: list[Cell]) -> list[str]:
    return [f"| {c.model} | {c.batch} | {c.median_s(TORCHVISION) * 1e3:.1f} | {c.median_s(UNPRUNED) * 1e3:.1f} | "
            f"{c.ratio(UNPRUNED, TORCHVISION):.3f} |" for c in cells if TORCHVISION in c.samples]


def _pruning_rows(variants: dict[str, list[Variant]]) -> list[str]:
    rows = []
    for name, group in variants.items():
        unpruned = _find(group, UNPRUNED)
        for v in (v for v in group if v.label != TORCHVISION):
            rows.append(f"| {name} | {v.label} | {v.macs / 1e9:.2f} | {v.macs / unpruned.macs:.3f} | "
                        f"{v.params / 1e6:.2f} | {v.divisible:.2f} | {v.prune_s:.1f} |")
    return rows


def report(cells: list[Cell], variants: dict[str, list[Variant]], sides: dict[str, int], args: argparse.Namespace,
           command: str, clock_name: str, wall_s: float) -> str:
    """The markdown report: summary, per-cell latency table, pruning table, replay overhead, settings."""
    models = ", ".join(f"{name} {sides[name]}x{sides[name]}" for name in variants)
    lines = [
        "# Latency of pruned networks (CPU)",
        "",
        f"Reproduce: `{command}` ({wall_s / 60:.1f} min wall).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"onnxruntime {ort.__version__}; `torch.set_num_threads({args.threads})`, onnxruntime "
        f"`intra_op_num_threads={args.threads}` (sequential, all graph optimisations), float32, random weights, "
        f"eval mode. Models: {models}. Pruned with `graph.prune(rnet, flops_target={FLOPS_TARGET}, "
        "importance=\"l2\", round_to=r)`; MACs by `graph.pruning.multiply_adds` (torch's FlopCounterMode).",
        "",
        f"Timing: {clock_name} clock; per (model, backend, batch) one warm-up call per variant, then {args.repeats} "
        f"round-robin repeats (rotating start), each sample at least {args.min_sample:g} s of calls. Latency ratio = "
        "median over repeats of pruned / unpruned time in the same repeat (the unpruned baseline is the captured "
        "network for torch, its ONNX export for onnxruntime).",
        "",
        "## Summary: latency cut / MACs cut (goal >= 0.9 with rounding)",
        "",
        *_summary(cells, variants, tuple(args.round_to)),
        "",
        "## Per cell",
        "",
        f"Columns: MACs ratio pruned / unpruned; fraction of conv/linear layers whose output channels are multiples "
        f"of {DIVISOR}; unpruned and pruned median ms per call; latency ratio; latency cut / MACs cut = "
        "(1 - latency ratio) / (1 - MACs ratio); torch only: pruned time / original torchvision module time.",
        "",
        f"| model | round_to | backend | batch | MACs ratio | ch % {DIVISOR} | unpruned ms | pruned ms | "
        "latency ratio | latency cut / MACs cut | vs torchvision module |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *_rows(cells, variants),
        "",
        "## Pruning",
        "",
        f"MACs at batch 1; ch % {DIVISOR}: fraction of conv/linear layers with output channels a multiple of "
        f"{DIVISOR}; prune s: seconds for `graph.prune` (bisection over the channel ratio).",
        "",
        f"| model | variant | GMACs | MACs ratio | params (M) | ch % {DIVISOR} | prune s |",
        "|---|---|---|---|---|---|---|",
        *_pruning_rows(variants),
        "",
        "## Replay overhead (torch eager)",
        "",
        "| model | batch | torchvision module ms | captured network ms | captured / module |",
        "|---|---|---|---|---|",
        *_overhead_rows(cells),
        "",
    ]
    return "\n".join(lines)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as temporary, open(temporary, "w") as handle:
        handle.write(text)


def _round_to(value: str) -> int | None:
    return None if value.lower() == "none" else int(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; ``--quick`` defaults to 2 repeats, batch 1, no report file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes (default 1 8; --quick: 1)")
    parser.add_argument("--round-to", nargs="+", type=_round_to, default=list(ROUND_TOS),
                        help="round_to values to prune with ('none' for no rounding)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--repeats", type=int, help="round-robin repeats per cell (default 5; --quick: 2)")
    parser.add_argument("--min-sample", type=float, default=0.2, help="minimum seconds of calls per sample")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="cpu: process CPU time (robust on a shared machine, only meaningful single-threaded); "
                             "auto: cpu with --threads 1, wall otherwise")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, batch 1, no report file")
    parser.add_argument("--out", help=f"markdown report path (default {os.path.relpath(DEFAULT_OUT, ROOT)}; "
                                      "none with --quick)")
    args = parser.parse_args(argv)
    args.batches = args.batches or ([1] if args.quick else [1, 8])
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.out = args.out or (None if args.quick else DEFAULT_OUT)
    if args.clock == "auto":
        args.clock = "cpu" if args.threads == 1 else "wall"
    return args


def main(argv: list[str] | None = None) -> None:
    """Command line: prune, export and time every model, then print and write the report."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    start = time.perf_counter()
    cells: list[Cell] = []
    variants: dict[str, list[Variant]] = {}
    sides: dict[str, int] = {}
    total = len(args.models) * len(args.backends) * len(args.batches) * args.repeats
    with tempfile.TemporaryDirectory(prefix="latency_onnx_") as directory, \
            tqdm(total=total, desc="latency", unit="repeat") as progress:
        for name in args.models:
            progress.set_description(f"{name} prune")
            variants[name], sides[name] = prepare(name, tuple(args.round_to))
            if "onnxruntime" in args.backends:
                progress.set_description(f"{name} export")
                model_directory = os.path.join(directory, name)
                os.makedirs(model_directory)
                export_all(variants[name], sides[name], model_directory)
            for backend in args.backends:
                for batch in args.batches:
                    cells.append(measure_cell(name, backend, batch, variants[name], sides[name], args, clock,
                                              progress))
                    for row in _rows(cells[-1:], variants):
                        tqdm.write(row)
            for variant in variants[name]:
                variant.network = None
    command = "python bench/latency.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = report(cells, variants, sides, args, command, args.clock, time.perf_counter() - start)
    if args.out:
        _write(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
