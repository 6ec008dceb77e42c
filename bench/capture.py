"""Benchmark graph capture on the whole torchvision zoo: capture time, exactness, replay overhead, capture memory.

Every classification and segmentation model of ``torchvision.models`` (and the backbones of the detection models)
is built with random weights and measured in a subprocess of its own, so one model's memory peak or crash cannot
disturb the next. For each model, at its native input size and batch 1:

* capture time (``graph.capture`` of the eval-mode model, under ``torch.no_grad``);
* exactness: max |replay - original| / max(1, max |original|) at batch 1 and at batch 2;
* replay time / original forward time: one warm-up each, then paired interleaved repeats, median ratio;
* capture peak memory: growth of the process's peak RSS (``resource.getrusage``) over the RSS just before capture,
  relative to the model's weight bytes plus the bytes of every distinct tensor one forward creates.

Run ``python bench/capture.py`` (``--help`` for subsets and settings); the table is printed and written to
``bench/results/capture.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.zoo import (build, native_size, relative_error, run_json_child, write_atomically,  # noqa: E402
                       zoo_names)
from graph import capture  # noqa: E402
from graph.capture import iter_tensors  # noqa: E402

EXACT_TOLERANCE = 1e-4
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "capture.md")


class _CreatedTensorBytes(TorchDispatchMode):
    """Sums the storage bytes of every distinct tensor created while active (kept alive, so none is reused)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, int] = {}
        self._keep: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for _, tensor in iter_tensors(out):
            storage = tensor.untyped_storage()
            self.storages.setdefault(storage.data_ptr(), storage.nbytes())
            self._keep.append(tensor)
        return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timings(original, replayed, x: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """Median original and replay seconds per call, and the median of the paired per-repeat ratios.

    After one warm-up call each, every repeat times both (alternating which goes first) over enough calls to last
    about 0.2 s. Times are this process's CPU time (torch runs single-threaded here), which other jobs on a shared
    machine disturb far less than wall time; pairing the two measurements of a repeat cancels most remaining drift.
    """
    original(x)
    replayed(x)
    start = time.process_time()
    original(x)
    calls = max(1, int(0.2 / max(time.process_time() - start, 1e-6)))
    times: dict[Any, list[float]] = {original: [], replayed: []}
    for repeat in range(repeats):
        for fn in (original, replayed) if repeat % 2 == 0 else (replayed, original):
            start = time.process_time()
            for _ in range(calls):
                fn(x)
            times[fn].append((time.process_time() - start) / calls)
    ratios = [r / o for o, r in zip(times[original], times[replayed])]
    return statistics.median(times[original]), statistics.median(times[replayed]), statistics.median(ratios)


def measure(name: str, repeats: int) -> dict:
    """All figures for one model (runs in the child process)."""
    torch.manual_seed(0)
    model = build(name)
    size = native_size(name, model)
    x1, x2 = torch.randn(1, 3, size, size), torch.randn(2, 3, size, size)
    with torch.no_grad():
        rss_before = _rss_bytes()
        start = time.process_time()
        net = capture(model, x1)
        capture_s = time.process_time() - start
        capture_growth = max(0, _peak_rss_bytes() - rss_before)
        weight_bytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
        counter = _CreatedTensorBytes()
        with counter:
            model(x1)
        activation_bytes = sum(counter.storages.values())
        del counter
        errors = [relative_error(model(x), net(x)) for x in (x1, x2)]
        original_s, replay_s, overhead = _timings(model, net, x1, repeats)
    return {"name": name, "size": size, "nodes": len(net.graph_nodes), "capture_s": capture_s,
            "error_b1": errors[0], "error_b2": errors[1], "original_s": original_s, "replay_s": replay_s,
            "overhead": overhead, "weight_mb": weight_bytes / 2**20,
            "activation_mb": activation_bytes / 2**20,
            "capture_mem_ratio": capture_growth / (weight_bytes + activation_bytes)}


def run_child(name: str, repeats: int, threads: int, timeout: float) -> dict:
    """Measure one model in a fresh interpreter; failures and timeouts come back as ``{"error": ...}``."""
    command = [sys.executable, os.path.abspath(__file__), "--child", name, "--repeats", str(repeats),
               "--threads", str(threads)]
    return run_json_child(command, name, timeout)


def _row(result: dict) -> str:
    if "error" in result:
        return f"| {result['name']} | | | | | | | | | {result['error']} |"
    exact = "yes" if max(result["error_b1"], result["error_b2"]) <= EXACT_TOLERANCE else "NO"
    return (f"| {result['name']} | {result['size']} | {result['nodes']} | {result['capture_s']:.2f} | "
            f"{result['error_b1']:.1e} / {result['error_b2']:.1e} | {exact} | {result['original_s'] * 1e3:.1f} | "
            f"{result['overhead']:.3f} | {result['capture_mem_ratio']:.2f} "
            f"({result['weight_mb']:.0f} + {result['activation_mb']:.0f} MB) | |")


def report(results: list[dict], command: str, threads: int, repeats: int, wall_s: float) -> str:
    """The markdown table with totals, the command and machine notes."""
    good = [r for r in results if "error" not in r]
    exact = [r for r in good if max(r["error_b1"], r["error_b2"]) <= EXACT_TOLERANCE]
    overheads = [r["overhead"] for r in good]
    worst = max(good, key=lambda r: r["overhead"], default=None)
    lines = [
        "# Capture benchmark: the torchvision zoo",
        "",
        f"Reproduce: `{command}` ({wall_s / 60:.1f} min wall).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}; "
        f"`torch.set_num_threads({threads})`, CPU, float32, eval mode, `torch.no_grad()`, random weights. "
        "Each model runs in its own subprocess. Times are process CPU times (the machine was shared with other "
        "jobs, which disturb wall-clock times much more).",
        "",
        f"- captured exactly (relative error <= {EXACT_TOLERANCE:g} at batch 1 and 2): **{len(exact)} / "
        f"{len(results)}**" + (f" ({len(results) - len(good)} failed to run, see last column)"
                               if len(good) < len(results) else ""),
        f"- replay time / original forward time: median **{statistics.median(overheads):.3f}**, "
        f"max **{worst['overhead']:.3f}** ({worst['name']})" if worst else "- no timings",
        "",
        "Columns: input side (batch 1, 3 channels); graph nodes; capture seconds; relative error "
        "max|replay - original| / max(1, max|original|) at batch 1 / batch 2; original forward ms; replay / "
        f"original time (median of {repeats} paired, interleaved repeats after a warm-up); capture memory: growth "
        "of peak RSS during capture over (weight bytes + bytes of all tensors one forward creates).",
        "",
        "| model | side | nodes | capture s | rel. error b1 / b2 | exact | forward ms | replay / original | "
        "capture mem (weights + activations) | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in results),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: measure the zoo (or ``--models``) and write the markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="model names (default: the whole zoo)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats per model")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each child")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model")
    parser.add_argument("--out", default=DEFAULT_OUT, help="markdown report path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.child, args.repeats)))
        return
    names = args.models or zoo_names()
    unknown = sorted(set(names) - set(zoo_names()))
    if unknown:
        parser.error(f"unknown model names: {', '.join(unknown)}")
    start = time.perf_counter()
    results = []
    for name in tqdm(names, desc="capture benchmark", unit="model"):
        results.append(run_child(name, args.repeats, args.threads, args.timeout))
        tqdm.write(_row(results[-1]))
    command = "python bench/capture.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = report(results, command, args.threads, args.repeats, time.perf_counter() - start)
    write_atomically(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
