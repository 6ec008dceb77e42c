"""Benchmark 50% channel pruning on the whole torchvision zoo: ours against Torch-Pruning 1.6, side by side.

Every classification and segmentation model of ``torchvision.models`` (and the backbone with its FPN of every
detection model, since detectors' post-processing is data-dependent) is built with random weights, in eval mode,
at its native input size and batch 1. Each side of each model runs in a fresh subprocess with a timeout:

* ours: ``graph.capture``, ``rnet.channel_groups()`` (dependency analysis), then ``plan_by_ratio(rnet, 0.5, "l2")``
  and ``prune_channels``; the pruned network must run and give outputs of the original's shapes (so the classifier,
  whose channels reach the output, was left alone); exactness is max |pruned - masked| / max(1, max |masked|)
  against ``mask_channels`` of the same plan, and whether every pruned group is channel-wise exact;
* peer: ``tp.pruner.MetaPruner(model, x, MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=...)`` (the
  constructor builds the dependency graph) and ``pruner.step()``, ignoring the Conv/Linear layers whose outputs
  reach the model outputs through no other Conv/Linear (the classifiers; for backbones the FPN's output convs);
  the pruned model must run and give outputs of the original's shapes.

Times are process CPU times with ``torch.set_num_threads(1)``. MACs are counted for both sides with torch's
``FlopCounterMode`` on the same input (and, for the peer, also with ``tp.utils.count_ops_and_params``).

Run ``pip install -e ".[bench]" && python bench/prune_zoo.py`` (``--help`` for subsets and settings); the table is
printed and written to ``bench/results/prune_zoo.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.zoo import (add_side_arguments, build, failure, failure_section, family, native_size,  # noqa: E402
                       relative_error, run_json_child, timed, write_atomically, zoo_names)
from graph import capture  # noqa: E402
from graph.capture import iter_tensors  # noqa: E402
from graph.pruning import mask_channels, plan_by_ratio, prune_channels  # noqa: E402

RATIO = 0.5
EXACT_TOLERANCE = 1e-4
FAMILIES = ("classification", "segmentation", "detection")
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "prune_zoo.md")


def _macs(module: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of one forward on ``x``, counted by torch's ``FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() // 2


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _same_shapes(reference: Any, other: Any) -> bool:
    """True when ``other`` has the structure and tensor shapes of ``reference``."""
    ref, out = list(iter_tensors(reference)), list(iter_tensors(other))
    return len(ref) == len(out) and all(pa == pb and a.shape == b.shape for (pa, a), (pb, b) in zip(ref, out))


def _setup(name: str) -> tuple[nn.Module, torch.Tensor, Any]:
    """The seeded model, its input and its reference output (identical for both sides)."""
    torch.manual_seed(0)
    model = build(name)
    size = native_size(name, model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        reference = model(x)
    return model, x, reference


def measure_ours(name: str) -> dict:
    """Capture, dependency analysis, 50% L2 pruning, forward, exactness, MACs and params for one model."""
    model, x, reference = _setup(name)
    result: dict = {"name": name, "macs_before": _macs(model, x)}
    stage = "capture"
    try:
        rnet, result["capture_s"] = timed(lambda: capture(model, x))
        result["params_before"] = _params(rnet)
        stage = "channel_groups"
        groups, result["groups_s"] = timed(rnet.channel_groups)
        result["groups"], result["prunable"] = len(groups), sum(g.prunable for g in groups)
        stage = "prune"
        plan, plan_s = timed(lambda: plan_by_ratio(rnet, RATIO, "l2"))
        pruned, prune_s = timed(lambda: prune_channels(rnet, plan))
        result["plan_s"], result["prune_s"] = plan_s, plan_s + prune_s
        result["pruned_groups"] = len(plan)
        result["inexact_groups"] = sum(not g.exact for g in plan)
        stage = "forward after pruning"
        with torch.no_grad():
            out = pruned(x)
        result["forward_ok"] = _same_shapes(reference, out)
        stage = "mask_channels"
        channel_wise = {group: drop for group, drop in plan.items() if group.exact}
        with torch.no_grad():
            result["max_diff"] = relative_error(mask_channels(rnet, plan)(x), out)
            result["exact_diff"] = relative_error(mask_channels(rnet, channel_wise)(x),
                                                  prune_channels(rnet, channel_wise)(x)) if channel_wise else 0.0
        stage = "count MACs"
        # FlopCounterMode's module tracker asserts on networks whose parameter nodes return leaf tensors (ViT's class
        # token); rnet.flops() counts exactly FlopCounterMode's MACs (tests/test_flops.py).
        result["macs_after"], result["params_after"] = pruned.flops().total_macs, _params(pruned)
    except Exception as error:  # noqa: BLE001 - every failure is a benchmark result
        result.update(failure(stage, error))
    return result


def final_layers(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The Conv/Linear modules whose outputs reach the model's outputs through no other Conv/Linear (classifiers,
    FPN output convs), found by walking the autograd graph back from the outputs."""
    owners: dict[Any, nn.Module] = {}

    def remember(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            owners[output.grad_fn] = module

    handles = [m.register_forward_hook(remember) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.enable_grad():
            out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    found: dict[int, nn.Module] = {}
    seen: set = set()
    stack = [t.grad_fn for _, t in iter_tensors(out)]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in owners:
            found[id(owners[fn])] = owners[fn]
        else:
            stack.extend(parent for parent, _ in fn.next_functions)
    return list(found.values())


def time_peer_pruning(model: nn.Module, x: torch.Tensor, ignored: list[nn.Module], result: dict) -> bool:
    """Build Torch-Pruning's ``MetaPruner`` (L2 magnitude, ``RATIO``, ``ignored`` layers) and run ``step()``,
    recording CPU seconds in ``result["build_s"]`` and ``result["prune_s"]``; False, with the failure and its stage
    in ``result``, when either raises."""
    import torch_pruning as tp

    stage = "build (MetaPruner)"
    try:
        pruner, result["build_s"] = timed(lambda: tp.pruner.MetaPruner(
            model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=RATIO,
            ignored_layers=ignored))
        stage = "step"
        _, result["prune_s"] = timed(pruner.step)
    except Exception as error:  # noqa: BLE001 - every failure is a benchmark result
        result.update(failure(stage, error))
        return False
    return True


def measure_peer(name: str) -> dict:
    """Torch-Pruning 1.6 MetaPruner at ratio 0.5 (L2 magnitude), forward after pruning, MACs and params."""
    import torch_pruning as tp

    model, x, reference = _setup(name)
    ignored = final_layers(model, x)
    tp_macs, _ = tp.utils.count_ops_and_params(model, x)
    result: dict = {"name": name, "macs_before": _macs(model, x), "params_before": _params(model),
                    "tp_macs_before": int(tp_macs), "ignored": len(ignored)}
    if not time_peer_pruning(model, x, ignored, result):
        return result
    stage = "forward after pruning"
    try:
        with torch.no_grad():
            out = model(x)
        result["forward_ok"] = _same_shapes(reference, out)
        stage = "count"
        result["macs_after"], result["params_after"] = _macs(model, x), _params(model)
        result["tp_macs_after"] = int(tp.utils.count_ops_and_params(model, x)[0])
    except Exception as error:  # noqa: BLE001 - every failure is a benchmark result
        result.update(failure(stage, error))
    return result


SIDES = {"ours": measure_ours, "peer": measure_peer}


def run_model(name: str, sides: list[str], threads: int, timeout: float) -> dict:
    """Both sides of one model, each in a fresh interpreter: ``{"name", "family", "ours", "peer"}``."""
    result = {"name": name, "family": family(name)}
    for side in sides:
        command = [sys.executable, os.path.abspath(__file__), "--child", name, "--side", side,
                   "--threads", str(threads)]
        result[side] = run_json_child(command, name, timeout)
    return result


def ok(side: dict | None) -> bool:
    """True when this side pruned the model and the pruned model ran with the original's output shapes."""
    return bool(side) and "error" not in side and side.get("forward_ok", False)


def _ours_seconds(ours: dict, with_capture: bool) -> float | None:
    if "prune_s" not in ours:
        return None
    return ours["groups_s"] + ours["prune_s"] + (ours["capture_s"] if with_capture else 0.0)


def _peer_seconds(peer: dict | None) -> float | None:
    return peer["build_s"] + peer["prune_s"] if peer and "prune_s" in peer else None


def time_ratio(result: dict, with_capture: bool) -> float | None:
    """(our groups + prune time [+ capture]) / (peer build + prune time), when both sides got that far."""
    ours, peer = _ours_seconds(result["ours"], with_capture), _peer_seconds(result.get("peer"))
    return ours / peer if ours is not None and peer else None


def _exact(ours: dict) -> bool:
    """Pruning the channel-wise groups of the plan equals masking them (groups through a norm over channels are
    inexact by nature and excluded)."""
    return ok(ours) and ours["exact_diff"] <= EXACT_TOLERANCE


def _f(value: float | None, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def _reduction(side: dict | None, key: str) -> str:
    if not side or f"{key}_after" not in side:
        return ""
    return f"{side[f'{key}_after'] / side[f'{key}_before']:.2f}"


def _cause(side: dict | None) -> str:
    if not side:
        return ""
    if "error" in side:
        return f"{side.get('stage', 'run')}: {side['error']}".replace("|", "/")
    return "" if side.get("forward_ok") else "pruned outputs have other shapes"


def _row(result: dict) -> str:
    ours, peer = result["ours"], result.get("peer")
    groups = f"{ours['prunable']} / {ours['groups']}" if "groups" in ours else ""
    exact = (("yes" if _exact(ours) else "NO") + f" ({ours['exact_diff']:.0e})" + (
        f"; all: {ours['max_diff']:.0e}, {ours['inexact_groups']} inexact" if ours["inexact_groups"] else "")
        if "exact_diff" in ours else "")
    macs = f"{ours['macs_before'] / 1e9:.2f}" if "macs_before" in ours else ""
    plan = f" ({ours['plan_s']:.2f})" if "plan_s" in ours else ""
    notes = "; ".join(f"{side}: {_cause(s)}" for side, s in (("ours", ours), ("peer", peer)) if _cause(s))
    return (f"| {result['name']} | {'yes' if ok(ours) else '**NO**'} | {groups} | {exact} | "
            f"{_f(ours.get('capture_s'))} | {_f(ours.get('groups_s'))} | {_f(ours.get('prune_s'))}{plan} | "
            f"{'' if peer is None else 'yes' if ok(peer) else 'no'} | {_f(peer and peer.get('build_s'))} | "
            f"{_f(peer and peer.get('prune_s'))} | {_f(time_ratio(result, False), '.3f')} | "
            f"{_f(time_ratio(result, True), '.3f')} | {macs} | {_reduction(ours, 'macs')} | "
            f"{_reduction(peer, 'macs')} | {_reduction(ours, 'params')} | {_reduction(peer, 'params')} | {notes} |")


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}" if values else "n/a"


def _totals(results: list[dict], with_peer: bool) -> list[str]:
    lines = ["| family | models | pruned OK (ours) | pruned OK (peer) | exact channel-wise groups (ours) |",
             "|---|---|---|---|---|"]
    for name in (*FAMILIES, "all"):
        subset = [r for r in results if name in ("all", r["family"])]
        if subset:
            peer = f"{sum(ok(r.get('peer')) for r in subset)}" if with_peer else "not run"
            lines.append(f"| {name} | {len(subset)} | {sum(ok(r['ours']) for r in subset)} | {peer} | "
                         f"{sum(_exact(r['ours']) for r in subset)} |")
    lines.append("")
    both = [r for r in results if time_ratio(r, False) is not None]
    for with_capture, label in ((False, "groups + prune"), (True, "capture + groups + prune")):
        ratios = [time_ratio(r, with_capture) for r in both]
        ours_sum = sum(_ours_seconds(r["ours"], with_capture) for r in both)
        peer_sum = sum(_peer_seconds(r["peer"]) for r in both)
        if ratios:
            worst = max(both, key=lambda r: time_ratio(r, with_capture))
            lines.append(f"- time ratio ours ({label}) / peer (build + prune), over the {len(both)} models where "
                         f"both sides finished pruning: median **{_median(ratios)}**, max {max(ratios):.3f} "
                         f"({worst['name']}), "
                         f"summed times {ours_sum:.1f} s / {peer_sum:.1f} s = **{ours_sum / peer_sum:.3f}**")
    for side in ("ours", "peer") if with_peer else ("ours",):
        done = [r[side] for r in results if ok(r.get(side))]
        macs = [s["macs_after"] / s["macs_before"] for s in done]
        params = [s["params_after"] / s["params_before"] for s in done]
        lines.append(f"- {side}: MACs after / before, median over the {len(done)} pruned models: "
                     f"**{_median(macs)}**; params after / before: **{_median(params)}**")
    return lines


def report(results: list[dict], command: str, threads: int, jobs: int, timeout: float, wall_s: float,
           with_peer: bool) -> str:
    """The markdown report: settings, totals per family, time ratios, then one row per model."""
    import importlib.metadata

    peer_version = importlib.metadata.version("torch-pruning") if with_peer else "not run"
    concurrency = ("one model at a time" if jobs == 1 else
                   f"**{jobs} models at a time** (`--jobs {jobs}`) on {os.cpu_count()} cores, so the two sides of "
                   "one model may have shared the CPU with other models: ratios are less clean than with --jobs 1")
    return "\n".join([
        "# Channel pruning on the torchvision zoo: ours vs Torch-Pruning",
        "",
        f"Reproduce: `{command}` ({wall_s / 60:.1f} min wall, {concurrency}).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"torch-pruning {peer_version}; `torch.set_num_threads({threads})`, CPU, float32, eval mode, random "
        f"weights, batch 1 at each model's native side (299 for inception_v3). Each side of each model runs in its "
        f"own subprocess (timeout {timeout:.0f} s). Times are process CPU times. Detection models: "
        "`model.backbone` (with its FPN) for both tools.",
        "",
        f"Pruning ratio {RATIO} everywhere. Ours: `plan_by_ratio(rnet, {RATIO}, \"l2\")` (local) + `prune_channels`; "
        f"peer: `tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2), "
        f"pruning_ratio={RATIO}, ignored_layers=<final Conv/Linear layers>)` + `step()`. \"Pruned OK\" = no "
        "exception and the pruned model's outputs have the original's shapes.",
        "",
        *_totals(results, with_peer),
        "",
        "Columns: ours OK; prunable / all channel groups; exact = the plan restricted to its channel-wise groups "
        f"prunes like it masks: max |pruned - masked| / max(1, max |masked|) <= {EXACT_TOLERANCE:g} (value in "
        "brackets; where the plan also holds inexact groups, through LayerNorm over channels, the whole plan's "
        "difference and their count follow); our capture, dependency analysis (`channel_groups`) and plan + prune "
        "seconds (plan alone in brackets); peer OK; peer build (constructor = "
        "dependency graph) and `step()` seconds; time ratio ours (groups + prune) / peer (build + prune), and with "
        "our capture added; original GMACs (FlopCounterMode); MACs and params after / before for each side (our "
        "params count what the captured eval forward uses: GoogLeNet's and Inception-v3's auxiliary classifiers are "
        "not part of it, while they stay, unpruned, in the peer's model).",
        "",
        "| model | ours OK | groups | exact (max diff) | capture s | groups s | prune s | peer OK | peer build s "
        "| peer step s | time ratio | ratio incl. capture | GMACs | MACs ours | MACs peer | params ours "
        "| params peer | failure causes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in results),
        "",
    ])


def _failures(results: list[dict]) -> list[str]:
    """Our failures with stage, exception and last frames (library bugs)."""
    return failure_section("Models we failed to prune", [(r["name"], _cause(r["ours"]), r["ours"]) for r in results
                                                        if not ok(r["ours"])])


def main(argv: list[str] | None = None) -> None:
    """Command line: prune the zoo (or ``--models``) with both tools and write the markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated model names (default: the whole zoo)")
    parser.add_argument("--jobs", type=int, default=1, help="models measured at the same time")
    add_side_arguments(parser, list(SIDES), timeout=300, out=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(SIDES[args.side](args.child)))
        return
    names = args.models.split(",") if args.models else zoo_names()
    unknown = sorted(set(names) - set(zoo_names()))
    if unknown:
        parser.error(f"unknown model names: {', '.join(unknown)}")
    sides = ["ours"] if args.skip_peer else ["ours", "peer"]
    start = time.perf_counter()
    by_name: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_model, name, sides, args.threads, args.timeout) for name in names]
        for future in tqdm(as_completed(futures), total=len(futures), desc="prune benchmark", unit="model"):
            result = future.result()
            by_name[result["name"]] = result
            tqdm.write(_row(result))
    results = [by_name[name] for name in names]
    command = "python bench/prune_zoo.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = report(results, command, args.threads, args.jobs, args.timeout, time.perf_counter() - start,
                  not args.skip_peer)
    text += "\n".join(["", *_failures(results)])
    write_atomically(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
