"""Shared pieces of the benchmarks: the torchvision model list, building a model, its input side, per-model
subprocesses with a timeout, CPU timing, failure records, output comparison and atomic report writing."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import traceback
from typing import Any, Callable

import torch
import torchvision

from graph.capture import iter_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONE_SUFFIX = ".backbone"
NATIVE_SIZES = {"inception_v3": 299, "ssd300_vgg16.backbone": 300, "ssdlite320_mobilenet_v3_large.backbone": 320}


def zoo_names() -> list[str]:
    """Every classification and segmentation model name, then ``<detection model>.backbone`` for each detector."""
    models = torchvision.models
    return (models.list_models(module=models) + models.list_models(module=models.segmentation)
            + [name + BACKBONE_SUFFIX for name in models.list_models(module=models.detection)])


def family(name: str) -> str:
    """``classification``, ``segmentation`` or ``detection`` (a detector's backbone) for a :func:`zoo_names` name."""
    if name.endswith(BACKBONE_SUFFIX):
        return "detection"
    models = torchvision.models
    return "segmentation" if name in models.list_models(module=models.segmentation) else "classification"


def build(name: str) -> torch.nn.Module:
    """The eval-mode model called ``name`` with random weights (no download, backbones included)."""
    models = torchvision.models
    if name.endswith(BACKBONE_SUFFIX):
        detector = models.get_model(name[: -len(BACKBONE_SUFFIX)], weights=None, weights_backbone=None)
        return detector.backbone.eval()
    if family(name) == "segmentation":
        return models.get_model(name, weights=None, weights_backbone=None).eval()
    return models.get_model(name, weights=None).eval()


def native_size(name: str, model: torch.nn.Module) -> int:
    """The image side the model was designed for (ViTs fix it in ``image_size``)."""
    return getattr(model, "image_size", NATIVE_SIZES.get(name, 224))


def relative_error(reference: Any, other: Any) -> float:
    """max |other - reference| / max(1, max |reference|) over all output tensors; inf when structure or shapes
    differ."""
    pairs = list(zip(iter_tensors(reference), iter_tensors(other), strict=True))
    worst = 0.0
    for (path_a, a), (path_b, b) in pairs:
        if path_a != path_b or a.shape != b.shape:
            return float("inf")
        worst = max(worst, float((a - b).abs().max()) / max(1.0, float(a.abs().max())))
    return worst


def run_json_child(command: list[str], name: str, timeout: float) -> dict:
    """Run ``command`` (which prints one JSON object as its last stdout line) in a fresh process; a crash or
    timeout comes back as ``{"name": name, "error": ...}``."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timeout after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode < 0:
        return {"name": name, "error": f"killed by signal {-done.returncode} (9: most likely out of memory)"}
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"name": name, "error": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), process CPU seconds it took)``."""
    start = time.process_time()
    value = fn()
    return value, time.process_time() - start


def failure(stage: str, error: BaseException) -> dict:
    """The exception's type and first message line, the stage it happened in and its last frames."""
    message = (str(error).strip().splitlines() or [""])[0][:300]
    frames = traceback.extract_tb(error.__traceback__)[-4:]
    return {"stage": stage, "error": f"{type(error).__name__}: {message}",
            "frames": [f"{os.path.relpath(f.filename, ROOT) if f.filename.startswith(ROOT) else f.filename}:"
                       f"{f.lineno} {f.name}" for f in frames]}


def failure_section(title: str, failed: list[tuple[str, str, dict]]) -> list[str]:
    """Markdown lines listing ``(model, cause, result)`` failures with the last frames of each result."""
    lines = []
    for name, cause, result in failed:
        lines.append(f"- {name}: {cause}")
        lines.extend(f"    - {frame}" for frame in result.get("frames", []))
    return [f"## {title}", "", *lines, ""] if lines else []


def add_side_arguments(parser: argparse.ArgumentParser, sides: list[str], timeout: float, out: str) -> None:
    """The options every ours-vs-peer benchmark takes: ``--skip-peer``, ``--threads``, ``--timeout``, ``--out``, and
    the hidden ``--child NAME --side SIDE`` of its per-model subprocesses."""
    parser.add_argument("--skip-peer", action="store_true", help="run only our side")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each child")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per model and side")
    parser.add_argument("--out", default=out, help="markdown report path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=sorted(sides), help=argparse.SUPPRESS)


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)
