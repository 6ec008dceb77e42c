"""Benchmark graph capture on the whole torchvision zoo: capture time, exactness, replay overhead, capture memory.

Every classification and segmentation model of ``torchvision.models`` (and the backbones of the detection models)
is built with random weights and measured in a subprocess of its own, so one model's memory peak or crash cannot
disturb the next. For each model, at its native input size and batch 1:

* capture time (``graph.capture`` of the eval-mode model, under ``torch.no_grad``);
* exactness: max |replay - original| / max(1, max |original|) at batch 1 and at batch 2;
* replay time / original forward time: one warm-up each, then paired interleaved repeats, median ratio;
* capture peak memory: growth of the process's peak RSS (``resource.getrusage``) over the RSS just before capture,
  relative to the model's weight bytes plus the bytes of every distinct tensor one forward creates;
* trains: captured in eval mode under ``torch.no_grad`` (batch 2, side 64 where the model takes it, else its native
  side), one seeded SGD step in train mode on the network and on a copy of the model: the loss, the total gradient
  norm and the eval-mode output after the step (so the updated weights and BatchNorm buffers) must agree;
* batch 1 -> 3: the network captured at batch 1 replays a batch of 3 like the model.

The training loss is the mean square of the first output tensor (the logits). ``--hf`` measures capture time and the
last two checks over the Hugging Face families of ``bench/prune_transformers.py`` instead, in eager and sdpa
attention (train check on two padded sequences of 9 tokens; batch 1 captured from one unpadded prompt of 9 tokens
and replayed at batch 3 with 5 tokens), and writes ``bench/results/capture_hf.md``.

Run ``python bench/capture.py`` (``--help`` for subsets and settings); the table is printed and written to
``bench/results/capture.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

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
TRAIN_SIDE = 64  # side of the train-mode check's images where the model accepts it (else its native side)
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "capture.md")
DEFAULT_HF_OUT = os.path.join(ROOT, "bench", "results", "capture_hf.md")


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


def train_step_error(model: torch.nn.Module, net: torch.nn.Module, inputs: tuple[tuple, dict],
                     loss_of: Callable[[Any], torch.Tensor]) -> float:
    """Largest relative difference between ``model`` (a copy of it) and ``net`` over one seeded SGD step in train
    mode: the loss, the total gradient norm, and the eval-mode output on the same inputs after the step."""
    args, kwargs = inputs
    figures = []
    for module in (copy.deepcopy(model), net):
        module.train()
        optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
        torch.manual_seed(0)
        loss = loss_of(module(*args, **kwargs))
        loss.backward()
        grad_norm = sum(float(p.grad.double().pow(2).sum()) for p in module.parameters() if p.grad is not None)
        optimizer.step()
        module.eval()
        with torch.no_grad():
            after = module(*args, **kwargs)
        figures.append((float(loss.detach()), grad_norm ** 0.5, after))
    (loss_a, norm_a, after_a), (loss_b, norm_b, after_b) = figures
    return max(abs(loss_a - loss_b) / max(1.0, abs(loss_a)), abs(norm_a - norm_b) / max(1.0, norm_a),
               relative_error(after_a, after_b))


def _first_logits(output: Any) -> torch.Tensor:
    return next(iter_tensors(output))[1]


def _image_train_error(model: torch.nn.Module, size: int) -> float:
    """:func:`train_step_error` for an image model captured in eval mode under no_grad at batch 2."""
    side = TRAIN_SIDE
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, side, side))
    except Exception:  # the model needs its native size (ViT) or more than TRAIN_SIDE pixels
        side = size
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        net = capture(model.eval(), x)
    return train_step_error(model, net, ((x,), {}), _mean_square)


def _mean_square(output: Any) -> torch.Tensor:
    return _first_logits(output).float().pow(2).mean()


def measure_hf(family_attention: str) -> dict:
    """Capture time, the train-mode check and batch 1 -> 3 for one Hugging Face family and attention (child)."""
    from bench.prune_transformers import build as build_hf
    from bench.prune_transformers import inputs as hf_inputs

    family, attention = family_attention.split(":")
    model = build_hf(family, attention)
    args, kwargs = hf_inputs(family, 2, 9)
    with torch.no_grad():
        net = capture(model, *args, **kwargs)
    train_error = _checked(lambda: train_step_error(model, net, (args, kwargs), _mean_square))
    model.eval()
    (prompt,), options = hf_inputs(family, 1, 9)
    options.pop("attention_mask", None)
    with torch.no_grad():
        start = time.process_time()
        net = capture(model, prompt, **options)
        capture_s = time.process_time() - start
        (batch,), _ = hf_inputs(family, 3, 5, seed=4)
        error_b3 = _checked(lambda: relative_error(model(batch, **options), net(batch, **options)))
    return {"name": family_attention, "capture_s": capture_s, "train_error": train_error, "error_b3": error_b3}


def _hf_row(result: dict) -> str:
    if "error" in result:
        return f"| {result['name']} | | | | {result['error']} |"
    return (f"| {result['name']} | {result['capture_s']:.2f} | {_verdict(result['train_error'])} | "
            f"{_verdict(result['error_b3'])} | |")


def hf_report(results: list[dict], command: str, wall_s: float) -> str:
    """The markdown table of the Hugging Face families."""
    return "\n".join([
        "# Capture benchmark: Hugging Face families (train mode from an eval capture, batch 1 -> 3)",
        "",
        f"Reproduce: `{command}` ({wall_s / 60:.1f} min wall). Tiny random models of `bench/prune_transformers.py`, "
        f"CPU, float32; each in its own subprocess; torch {torch.__version__}.",
        "",
        *_counts(results),
        "",
        "Columns: capture seconds (batch-1 prompt, process CPU time); trains: captured in eval mode under no_grad "
        "on two padded sequences, one seeded SGD step in train mode (dropout on), largest relative difference of "
        "loss, gradient norm and eval output after the step; batch 1 -> 3: relative error at batch 3 (5 tokens) of "
        "the network captured from one prompt of 9 tokens.",
        "",
        "| family:attention | capture s | trains (eval capture, no_grad) | batch 1 -> 3 | error |",
        "|---|---|---|---|---|",
        *(_hf_row(r) for r in results),
        "",
    ])


def _checked(figure: Callable[[], float]) -> float | str:
    """The figure, or the error that stopped it (a ReplayError when replay refuses)."""
    try:
        return figure()
    except Exception as error:  # reported in the table
        return f"{type(error).__name__}: {str(error)[:160]}"


def measure(name: str, repeats: int) -> dict:
    """All figures for one model (runs in the child process); ``repeats=0`` skips the timings and the memory
    figures (reported as nan), for a quick run of the exactness, train-mode and batch-size checks."""
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
        activation_bytes = float("nan")
        if repeats:
            counter = _CreatedTensorBytes()
            with counter:
                model(x1)
            activation_bytes = sum(counter.storages.values())
            del counter
        errors = [relative_error(model(x), net(x)) for x in (x1, x2)]
        x3 = torch.randn(3, 3, size, size)
        error_b3 = _checked(lambda: relative_error(model(x3), net(x3)))
        original_s, replay_s, overhead = _timings(model, net, x1, repeats) if repeats else (float("nan"),) * 3
    train_error = _checked(lambda: _image_train_error(model, size))
    return {"name": name, "size": size, "nodes": len(net.graph_nodes), "capture_s": capture_s,
            "error_b1": errors[0], "error_b2": errors[1], "error_b3": error_b3, "train_error": train_error,
            "original_s": original_s, "replay_s": replay_s,
            "overhead": overhead, "weight_mb": weight_bytes / 2**20,
            "activation_mb": activation_bytes / 2**20,
            "capture_mem_ratio": capture_growth / (weight_bytes + activation_bytes)}


def run_child(name: str, repeats: int, threads: int, timeout: float) -> dict:
    """Measure one model in a fresh interpreter; failures and timeouts come back as ``{"error": ...}``."""
    command = [sys.executable, os.path.abspath(__file__), "--child", name, "--repeats", str(repeats),
               "--threads", str(threads)]
    return run_json_child(command, name, timeout)


def _passes(figure: float | str) -> bool:
    return not isinstance(figure, str) and figure <= EXACT_TOLERANCE


def _verdict(figure: float | str) -> str:
    """``yes (error)``, ``NO (error)`` or ``NO`` with the exception that stopped the check."""
    if isinstance(figure, str):
        return f"NO: {figure}".replace("|", "/").replace("\n", " ")
    return f"{'yes' if _passes(figure) else 'NO'} ({figure:.0e})"


def _measured_here(name: str, repeats: int) -> dict:
    """:func:`measure` in this process; an exception becomes the row's error."""
    try:
        return measure(name, repeats)
    except Exception as error:  # reported in the table
        return {"name": name, "error": f"{type(error).__name__}: {str(error)[:200]}"}


def _row(result: dict) -> str:
    if "error" in result:
        return f"| {result['name']} | | | | | | | | | | | {result['error']} |"
    exact = "yes" if max(result["error_b1"], result["error_b2"]) <= EXACT_TOLERANCE else "NO"
    return (f"| {result['name']} | {result['size']} | {result['nodes']} | {result['capture_s']:.2f} | "
            f"{result['error_b1']:.1e} / {result['error_b2']:.1e} | {exact} | {result['original_s'] * 1e3:.1f} | "
            f"{result['overhead']:.3f} | {result['capture_mem_ratio']:.2f} "
            f"({result['weight_mb']:.0f} + {result['activation_mb']:.0f} MB) | {_verdict(result['train_error'])} | "
            f"{_verdict(result['error_b3'])} | |")


def _counts(results: list[dict]) -> list[str]:
    """The two summary lines of the mode and batch-size checks."""
    return [f"- captured in eval under no_grad, trains in train mode (loss, gradients, updated weights and buffers "
            f"equal): **{sum(_passes(r.get('train_error', '')) for r in results)} / {len(results)}**",
            f"- captured at batch 1, replays at batch 3: **{sum(_passes(r.get('error_b3', '')) for r in results)} / "
            f"{len(results)}**"]


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
        *_counts(results),
        "",
        "Columns: input side (batch 1, 3 channels); graph nodes; capture seconds; relative error "
        "max|replay - original| / max(1, max|original|) at batch 1 / batch 2; original forward ms; replay / "
        f"original time (median of {repeats} paired, interleaved repeats after a warm-up); capture memory: growth "
        "of peak RSS during capture over (weight bytes + bytes of all tensors one forward creates); trains: "
        f"captured in eval mode under no_grad at batch 2 (side {TRAIN_SIDE} where the model takes it), one SGD step "
        "in train mode, largest relative difference of loss, gradient norm and eval output after the step; batch "
        "1 -> 3: relative error at batch 3 of the network captured at batch 1.",
        "",
        "| model | side | nodes | capture s | rel. error b1 / b2 | exact | forward ms | replay / original | "
        "capture mem (weights + activations) | trains (eval capture, no_grad) | batch 1 -> 3 | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in results),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: measure the zoo (or ``--models``) and write the markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="model names (default: the whole zoo)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved timing repeats per model (0: no timings or memory figures)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each child")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model")
    parser.add_argument("--out", default=DEFAULT_OUT, help="markdown report path")
    parser.add_argument("--hf", action="store_true", help="measure the Hugging Face families instead of the zoo")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every model in this process (no interpreter start per model; no isolation)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--hf-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child or args.hf_child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.child, args.repeats) if args.child else measure_hf(args.hf_child)))
        return
    command = "python bench/capture.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    if args.hf:
        run_hf(args, command)
        return
    names = args.models or zoo_names()
    unknown = sorted(set(names) - set(zoo_names()))
    if unknown:
        parser.error(f"unknown model names: {', '.join(unknown)}")
    start = time.perf_counter()
    results = []
    if args.in_process:
        torch.set_num_threads(args.threads)
    for name in tqdm(names, desc="capture benchmark", unit="model"):
        results.append(_measured_here(name, args.repeats) if args.in_process
                       else run_child(name, args.repeats, args.threads, args.timeout))
        tqdm.write(_row(results[-1]))
        text = report(results, command, args.threads, args.repeats, time.perf_counter() - start)
        write_atomically(args.out, text)  # after every model, so an interrupted run still reports what it measured
    print(text)


def run_hf(args: argparse.Namespace, command: str) -> None:
    """Measure every Hugging Face family in eager and sdpa attention and write the markdown report."""
    from bench.prune_transformers import ATTENTIONS, FAMILIES

    start = time.perf_counter()
    results = []
    for name in tqdm([f"{f}:{a}" for f in FAMILIES for a in ATTENTIONS], desc="HF capture checks", unit="model"):
        command_line = [sys.executable, os.path.abspath(__file__), "--hf-child", name, "--threads", str(args.threads)]
        results.append(run_json_child(command_line, name, args.timeout))
        tqdm.write(_hf_row(results[-1]))
        text = hf_report(results, command, time.perf_counter() - start)
        write_atomically(DEFAULT_HF_OUT if args.out == DEFAULT_OUT else args.out, text)
    print(text)


if __name__ == "__main__":
    main()
