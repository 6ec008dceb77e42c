"""Benchmark "prune and give me my model back" on Hugging Face vision families whose configs hold per-stage widths.

Each family is built from its config class with random weights at a tiny size (four stages of widths 16/32/48/64
where it has stages, one layer each; 64 x 64 images, 5 classes; nothing is downloaded), in eval mode, and put
inside the user's own module (``UserModule``: ``self.net = ...``, returning the logits). Then, in one process per
family: ``graph.capture`` of the wrapper on 2 images, ``plan_by_ratio(rnet, 0.5)`` (every default group),
``config_expressible_plan`` (what the config can hold, verified by writing it back; the rest is listed with the
reason), ``apply_plan``, ``save_pretrained`` / ``from_pretrained`` of the inner model, and the reloaded model's
logits against the pruned network's on 3 other images. The table gives the groups kept of those requested, the
width field after pruning (the per-stage list; Swin's per-stage head counts; FocalNet's embed_dim), params after /
before and the reload difference.

Run ``python bench/config_plan_vision.py`` (``--help`` for subsets); the table is printed and written to
``bench/results/config_plan_vision.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import transformers  # noqa: E402

from bench.zoo import failure, relative_error, run_json_child, timed, write_atomically  # noqa: E402
from graph import capture  # noqa: E402
from graph.config_plan import config_expressible_plan  # noqa: E402
from graph.pruning import plan_by_ratio  # noqa: E402
from graph.write_back import apply_plan  # noqa: E402

WIDTHS, DEPTHS, LABELS, IMAGE_SIZE, RATIO = [16, 32, 48, 64], [1, 1, 1, 1], 5, 64, 0.5
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "config_plan_vision.md")
_STAGES = dict(hidden_sizes=WIDTHS, depths=DEPTHS, num_labels=LABELS)
# family: (model class, config class, config fields, the config's per-stage width field)
FAMILIES = {
    "resnet": (transformers.ResNetForImageClassification, transformers.ResNetConfig,
               dict(_STAGES, embedding_size=16, layer_type="bottleneck"), "hidden_sizes"),
    "convnext": (transformers.ConvNextForImageClassification, transformers.ConvNextConfig, _STAGES, "hidden_sizes"),
    "regnet": (transformers.RegNetForImageClassification, transformers.RegNetConfig,
               dict(_STAGES, embedding_size=16, groups_width=8), "hidden_sizes"),
    "pvt_v2": (transformers.PvtV2ForImageClassification, transformers.PvtV2Config,
               dict(_STAGES, num_attention_heads=[1, 2, 3, 4]), "hidden_sizes"),
    "segformer": (transformers.SegformerForImageClassification, transformers.SegformerConfig,
                  dict(_STAGES, num_attention_heads=[1, 2, 3, 4]), "hidden_sizes"),
    "swin": (transformers.SwinForImageClassification, transformers.SwinConfig,
             dict(image_size=IMAGE_SIZE, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
                  num_labels=LABELS), "num_heads"),
    "focalnet": (transformers.FocalNetForImageClassification, transformers.FocalNetConfig,
                 dict(image_size=IMAGE_SIZE, embed_dim=16, depths=[1, 1], num_labels=LABELS), "embed_dim"),
}


class UserModule(nn.Module):
    """A user's own module holding the Hugging Face classifier and returning its logits."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values).logits


def _field(config, name: str) -> int | list[int]:
    """A config's width field as JSON: an int, or a list of the per-stage ints."""
    value = getattr(config, name)
    return list(value) if isinstance(value, (list, tuple)) else value


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure(family: str) -> dict:
    """Capture, plan, config-expressible plan, write-back and reload for one family."""
    model_class, config_class, fields, width_field = FAMILIES[family]
    torch.manual_seed(0)
    model = UserModule(model_class(config_class(**fields)).eval()).eval()
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    result: dict = {"name": family, "params_before": _params(model),
                    "widths_before": _field(model.net.config, width_field)}
    stage = "capture"
    try:
        rnet, result["capture_s"] = timed(lambda: capture(model, images))
        stage = "config_expressible_plan"
        requested = plan_by_ratio(rnet, RATIO)
        plan, result["plan_s"] = timed(lambda: config_expressible_plan(model, rnet, requested, inputs=((images,), {})))
        result.update(requested=len(requested), kept=len(plan),
                      left_out=sorted(f"{len(ids)} x {reason[:140]}" for reason, ids in plan.reasons().items()))
        stage = "apply_plan"
        written = apply_plan(model, rnet, plan, inputs=((images,), {}))
        result["params_after"] = _params(written)
        result["widths_after"] = _field(written.net.config, width_field)
        stage = "save / reload"
        other = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
        with tempfile.TemporaryDirectory() as folder:
            written.net.save_pretrained(folder)
            loaded = model_class.from_pretrained(folder).eval()
        with torch.no_grad():
            result["reload_diff"] = relative_error(rnet.prune_channels(plan)(other), loaded(other).logits)
    except Exception as error:  # noqa: BLE001 - every failure is a benchmark result
        result.update(failure(stage, error))
    return result


def _row(r: dict) -> str:
    params = f"{r['params_after'] / r['params_before']:.2f}" if "params_after" in r else ""
    reload = f"{r['reload_diff']:.0e}" if "reload_diff" in r else ""
    return (f"| {r['name']} | {r.get('kept', '')} / {r.get('requested', '')} | {r.get('widths_before', '')} -> "
            f"{r.get('widths_after', '')} | {params} | {reload} | {r.get('plan_s', 0):.2f} | "
            f"{'; '.join(r.get('left_out', [])).replace('|', '/')} | {r.get('error', '')} |")


def main(argv: list[str] | None = None) -> None:
    """Command line: every family (or ``--families``), one subprocess each, then the markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help=f"comma-separated subset of {', '.join(FAMILIES)}")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per family")
    parser.add_argument("--out", default=DEFAULT_OUT, help="markdown report path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(1)
        transformers.logging.set_verbosity_error()
        print(json.dumps(measure(args.child)))
        return
    families = args.families.split(",") if args.families else list(FAMILIES)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families: {', '.join(unknown)}")
    start = time.perf_counter()
    results = [run_json_child([sys.executable, os.path.abspath(__file__), "--child", f], f, args.timeout)
               for f in families]
    reloaded = sum("reload_diff" in r and r["reload_diff"] <= 1e-5 for r in results)
    command = "python bench/config_plan_vision.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = "\n".join([
        "# Prune and give me my model back: Hugging Face vision families inside the user's own module", "",
        f"Reproduce: `{command}` ({(time.perf_counter() - start) / 60:.1f} min wall on a shared 2-core machine). "
        "See the module docstring for the exact calls.", "",
        f"**Written back and reloaded with `from_pretrained` equal to the pruned network: {reloaded}/{len(results)} "
        f"families; groups kept: {sum(r.get('kept', 0) for r in results)} of "
        f"{sum(r.get('requested', 0) for r in results)} requested.**", "",
        "Columns: groups kept / requested by `config_expressible_plan`; the width field before -> after; "
        "params after / before; reload = max |from_pretrained - pruned network| / max(1, max |pruned network|); "
        "plan s = CPU seconds of `config_expressible_plan` (including its verifying write-backs); what was left "
        "out, with the reason.", "",
        "| family | groups kept / requested | width field | params | reload | plan s | left out | error |",
        "|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in results), ""])
    write_atomically(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
