"""Benchmark the speed of capture + 50% L2 channel pruning against Torch-Pruning 1.6, capture included.

Torch-Pruning's ``MetaPruner`` traces the model itself when it is constructed, so the fair comparison adds our
capture to our pruning time. For each model (resnet50, mobilenet_v2, vgg16, densenet121, efficientnet_b0,
regnet_y_400mf by default; random weights, eval mode, batch 1 at the native side) and each of ``--repeats`` rounds,
the sides run one after the other, each in a fresh interpreter with ``torch.set_num_threads(1)``:

* ours: ``graph.capture(model, x)``, then ``rnet.channel_groups()`` + ``plan_by_ratio(rnet, 0.5, "l2")`` +
  ``prune_channels`` (the pruning part);
* peer: ``tp.pruner.MetaPruner(model, x, MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=...)`` (its
  tracing and dependency graph) + ``pruner.step()``, with the classifier layers ignored as in ``bench/prune_zoo.py``;
* baseline (with ``--baseline DIR``): ours again, run by the copy of this file in ``DIR/bench/``, a checkout of
  another revision, so a change is measured before and after against the same peer rounds.

Before timing, every side builds the model and runs the same two untimed forwards (a no-grad reference and the
grad-mode forward that finds the peer's ignored layers), so all start from the same warm process state. Times are
process CPU times. Rounds alternate the order of the sides, so drift in the machine's load hits all of them. The
table gives, per model, the median over rounds of each stage and of the ratio ours (capture + pruning) / peer
(build + step); below it, the ratio of the summed medians and the median ratio.

Run ``pip install -e ".[bench]" && python bench/capture_speed.py`` (``--help`` for models, rounds, the baseline and
settings); the table is printed and written to ``bench/results/capture_speed.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torchvision  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.prune_zoo import RATIO, _setup, final_layers, time_peer_pruning  # noqa: E402
from bench.zoo import add_side_arguments, failure, run_json_child, timed, write_atomically, zoo_names  # noqa: E402
from graph import capture  # noqa: E402
from graph.pruning import plan_by_ratio, prune_channels  # noqa: E402

MODELS = ("resnet50", "mobilenet_v2", "vgg16", "densenet121", "efficientnet_b0", "regnet_y_400mf")
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "capture_speed.md")


def _prepared(name: str) -> tuple[torch.nn.Module, torch.Tensor, list[torch.nn.Module]]:
    """The seeded model, its input and the peer's ignored layers, after the untimed forwards every side runs."""
    model, x, _ = _setup(name)
    return model, x, final_layers(model, x)


def measure_ours(name: str) -> dict:
    """CPU seconds of our capture and of channel groups + 50% L2 plan + ``prune_channels`` on one model."""
    model, x, _ = _prepared(name)
    result: dict = {"name": name}
    stage = "capture"
    try:
        rnet, result["capture_s"] = timed(lambda: capture(model, x))
        stage = "prune"

        def prune() -> None:
            rnet.channel_groups()
            prune_channels(rnet, plan_by_ratio(rnet, RATIO, "l2"))

        _, result["prune_s"] = timed(prune)
    except Exception as error:  # noqa: BLE001 - every failure is a benchmark result
        result.update(failure(stage, error))
    return result


def measure_peer(name: str) -> dict:
    """CPU seconds of Torch-Pruning's ``MetaPruner`` construction and ``step()`` at ratio 0.5 on one model."""
    model, x, ignored = _prepared(name)
    result: dict = {"name": name}
    time_peer_pruning(model, x, ignored, result)
    return result


SIDES = {"ours": measure_ours, "peer": measure_peer}
STAGES = {"ours": ("capture_s", "prune_s"), "baseline": ("capture_s", "prune_s"), "peer": ("build_s", "prune_s")}


def total(side: str, result: dict) -> float | None:
    """The summed stage seconds of one side's result, or ``None`` when it failed."""
    return None if "error" in result else sum(result[key] for key in STAGES[side])


def _ratio(rounds: list[dict], side: str) -> float | None:
    """Median over the rounds of ``side``'s total / the peer's total in the same round (all rounds must finish)."""
    ratios = [total(side, r[side]) / total("peer", r["peer"]) for r in rounds
              if side in r and "peer" in r and total(side, r[side]) is not None and total("peer", r["peer"])]
    return statistics.median(ratios) if ratios and len(ratios) == len(rounds) else None


def summarise(name: str, rounds: list[dict]) -> dict:
    """Per-stage medians over the rounds of one model, the median ratios and the first failure of each side."""
    summary: dict = {"name": name}
    for side, keys in STAGES.items():
        done = [r[side] for r in rounds if side in r and "error" not in r[side]]
        failed = [r[side] for r in rounds if side in r and "error" in r[side]]
        if failed:
            summary[f"{side}_error"] = f"{failed[0].get('stage', 'run')}: {failed[0]['error']}"
        if done and not failed:
            for key in keys:
                summary[f"{side}_{key}"] = statistics.median(s[key] for s in done)
            summary[f"{side}_total"] = statistics.median(total(side, s) for s in done)
        if side != "peer" and _ratio(rounds, side) is not None:
            summary[f"{side}_ratio"] = _ratio(rounds, side)
    return summary


def _f(value: float | None, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def _row(s: dict, with_baseline: bool) -> str:
    notes = "; ".join(f"{side}: {s[f'{side}_error']}".replace("|", "/") for side in STAGES if f"{side}_error" in s)
    baseline = f" {_f(s.get('baseline_total'))} | {_f(s.get('baseline_ratio'))} |" if with_baseline else ""
    return (f"| {s['name']} | {_f(s.get('ours_capture_s'))} | {_f(s.get('ours_prune_s'))} | "
            f"{_f(s.get('ours_total'))} | {_f(s.get('peer_build_s'))} | {_f(s.get('peer_prune_s'))} | "
            f"{_f(s.get('peer_total'))} | {_f(s.get('ours_ratio'))} |{baseline} {notes} |")


def _totals(summaries: list[dict], side: str, label: str) -> list[str]:
    both = [s for s in summaries if f"{side}_ratio" in s]
    if not both:
        return [f"- {label}: no model finished on both sides"]
    ours, peer = sum(s[f"{side}_total"] for s in both), sum(s["peer_total"] for s in both)
    capture_share = sum(s[f"{side}_capture_s"] for s in both) / ours
    return [f"- {label} (capture + pruning) / peer (build + step), summed medians over the {len(both)} models that "
            f"both pruned: {ours:.2f} s / {peer:.2f} s = **{ours / peer:.3f}** (capture is {capture_share:.0%} of "
            f"it); median of the per-model ratios: **{statistics.median(s[f'{side}_ratio'] for s in both):.3f}**"]


def _revision(directory: str) -> str:
    """The short commit of a checkout, with ``+changes`` when its tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    return (commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")) if commit else \
        "not a git checkout"


def report(summaries: list[dict], command: str, repeats: int, threads: int, wall_s: float,
           baseline: str | None) -> str:
    """The markdown report: settings, the summed and median ratios, then one row per model."""
    import importlib.metadata

    base_columns = " baseline s | baseline ratio |" if baseline else ""
    return "\n".join([
        "# Capture + pruning speed: ours vs Torch-Pruning, capture included",
        "",
        f"Reproduce: `{command}` ({wall_s / 60:.1f} min wall), ours at {_revision(ROOT)}"
        + (f", baseline `{baseline}` at {_revision(baseline)}." if baseline else "."),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"torch-pruning {importlib.metadata.version('torch-pruning')}; `torch.set_num_threads({threads})`, CPU, "
        f"float32, eval mode, random weights, batch 1 at the native side. Process CPU seconds, median of {repeats} "
        "rounds; in each round the sides of a model run back to back, each in a fresh interpreter that first runs "
        "the same untimed forwards, their order alternating between rounds. The machine may be shared, so single "
        "figures are noisy; the ratios are measured side by side.",
        "",
        f"Ours: `capture(model, x)`, then `rnet.channel_groups()` + `plan_by_ratio(rnet, {RATIO}, \"l2\")` + "
        "`prune_channels` (pruning). Peer: `tp.pruner.MetaPruner(model, x, importance=tp.importance."
        f"MagnitudeImportance(p=2), pruning_ratio={RATIO}, ignored_layers=<final Conv/Linear layers>)` (build, "
        "which traces the model) + `step()`.",
        "",
        *_totals(summaries, "ours", "ours"),
        *(_totals(summaries, "baseline", "baseline") if baseline else []),
        "",
        "| model | our capture s | our groups + plan + prune s | ours s | peer build s | peer step s | peer s "
        f"| ratio ours / peer |{base_columns} failures |",
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if baseline else "") + "---|",
        *(_row(s, bool(baseline)) for s in summaries),
        "",
    ])


def _child_command(side: str, name: str, threads: int, baseline: str | None) -> list[str]:
    script = os.path.join(baseline, "bench", "capture_speed.py") if side == "baseline" else os.path.abspath(__file__)
    return [sys.executable, script, "--child", name, "--side", "ours" if side == "baseline" else side,
            "--threads", str(threads)]


def main(argv: list[str] | None = None) -> None:
    """Command line: time the sides of every model for ``--repeats`` rounds and write the markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per model (the table gives medians)")
    parser.add_argument("--baseline", help="a checkout of another revision with this file in its bench/: its "
                                           "capture and pruning are timed too (before/after in one run)")
    add_side_arguments(parser, list(SIDES), timeout=300, out=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(SIDES[args.side](args.child)))
        return
    names = args.models.split(",")
    unknown = sorted(set(names) - set(zoo_names()))
    if unknown:
        parser.error(f"unknown model names: {', '.join(unknown)}")
    if args.baseline and not os.path.isfile(os.path.join(args.baseline, "bench", "capture_speed.py")):
        parser.error(f"--baseline {args.baseline}: no bench/capture_speed.py there (copy this file into it)")
    sides = ["ours"] + ([] if args.skip_peer else ["peer"]) + (["baseline"] if args.baseline else [])
    start = time.perf_counter()
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    with tqdm(total=len(names) * args.repeats, desc="capture speed", unit="model") as bar:
        for repeat in range(args.repeats):
            for name in names:
                measured = {side: run_json_child(_child_command(side, name, args.threads, args.baseline), name,
                                                 args.timeout)
                            for side in (sides if repeat % 2 == 0 else sides[::-1])}
                rounds[name].append(measured)
                bar.update()
    summaries = [summarise(name, rounds[name]) for name in names]
    command = "python bench/capture_speed.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = report(summaries, command, args.repeats, args.threads, time.perf_counter() - start, args.baseline)
    write_atomically(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
