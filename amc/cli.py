"""The ``amc`` command line: ``amc inspect MODEL`` prints a network's node table; ``amc prune MODEL`` prunes it.

Other subcommands (``compress``, ``finetune``, ``search``) live in modules of their own, listed in
``COMMAND_MODULES``; each has ``register(commands)`` that adds its parser to the subcommands.
"""
from __future__ import annotations

import argparse
import importlib
import os
import random
import sys

import torch

from graph.errors import GraphError


SAVED_SUFFIXES = (".pkl", ".pt", ".json", ".vnmodel")
COMMAND_MODULES: tuple[str, ...] = ("amc.compress_command", "amc.finetune_command", "amc.search_command")


def load_network(model: str, input_size: tuple[int, ...], unchecked: bool = False):
    """A saved network file, or the torchvision model of that name (random weights) captured at ``input_size``;
    ``unchecked`` loads a hand-edited ``.json`` without its digests."""
    if os.path.exists(model):
        from graph.serialization import load

        return load(model, unchecked=unchecked)
    if model.lower().endswith(SAVED_SUFFIXES) or os.sep in model:
        raise FileNotFoundError(f"file not found: {model}")
    import torchvision

    from graph import capture

    if model not in torchvision.models.list_models():
        raise ValueError(f"unknown model {model!r}: give a torchvision model name or a saved network file")
    network = torchvision.models.get_model(model, weights=None).eval()
    return capture(network, torch.randn(*input_size))


def check_output_path(path: str | None) -> None:
    """Fail before any work when ``path``'s directory does not exist (the save happens at the very end)."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"output directory does not exist: {directory}")


def check_network_output(path: str | None) -> None:
    """Fail before any work when ``path`` is given and has no network format (``.pkl``, ``.json``, ``.vnmodel``)
    or its directory does not exist."""
    if path is None:
        return
    from graph.serialization import writer_for

    writer_for(path)
    check_output_path(path)


def fraction(include_one: bool = False):
    """An argparse type: a number in (0, 1), or (0, 1] with ``include_one``."""
    def parse(text: str) -> float:
        value = float(text)
        if not (0 < value <= 1 if include_one else 0 < value < 1):
            raise argparse.ArgumentTypeError(f"must be in (0, 1{']' if include_one else ')'}, got {text}")
        return value

    return parse


def seed_everything(seed: int | None) -> None:
    """Seed Python's, numpy's and torch's generators (``--seed``) so random models and data orders repeat."""
    if seed is None:
        return
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _input_size(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-size must be comma-separated integers, got {text!r}") from None


def inspect_command(args: argparse.Namespace) -> int:
    """Print every node (name, op, output shape, parameters, MACs) with totals; draw the graph with ``--draw``."""
    rnet = load_network(args.model, args.input_size, args.unchecked)
    print(rnet.flops())
    if args.draw:
        print(f"graph drawn to {rnet.draw(args.draw)}")
    return 0


def _group_table(plan: dict, limit: int) -> str:
    rows = [f"{'group':>6s} {'channels':>9s} {'kept':>6s}  nodes"]
    for group, removed in sorted(plan.items(), key=lambda item: item[0].id)[:limit]:
        nodes = group.nodes
        where = ", ".join(nodes[:3]) + (f", ... ({len(nodes)} nodes)" if len(nodes) > 3 else "")
        rows.append(f"{group.id:6d} {group.size:9d} {group.size - len(removed):6d}  {where}")
    if len(plan) > limit:
        rows.append(f"... {len(plan) - limit} more groups")
    return "\n".join(rows)


def prune_command(args: argparse.Namespace) -> int:
    """Prune a network's channels by ratio or to a MACs target, print before/after and the per-group table, save."""
    from graph.pruning import multiply_adds, plan_by_ratio, plan_for_flops, prune_channels
    from graph.serialization import save

    check_network_output(args.output)
    rnet = load_network(args.model, args.input_size, args.unchecked)
    options = dict(importance=args.importance, round_to=args.round_to, global_ranking=args.global_ranking,
                   ignore=args.ignore)
    if args.flops_target is not None:
        plan = plan_for_flops(rnet, args.flops_target, **options)
    else:
        plan = plan_by_ratio(rnet, args.channel_ratio, **options)
    pruned = prune_channels(rnet, plan)
    before = (sum(p.numel() for p in rnet.parameters()), multiply_adds(rnet))
    after = (sum(p.numel() for p in pruned.parameters()), multiply_adds(pruned))
    print(_group_table(plan, args.max_groups))
    print(f"{'':10s} {'before':>16s} {'after':>16s} {'ratio':>7s}")
    for label, old, new in (("params", before[0], after[0]), ("MACs", before[1], after[1])):
        print(f"{label:10s} {old:16,d} {new:16,d} {new / max(old, 1):7.3f}")
    if args.output:
        print(f"saved to {save(pruned, args.output)}")
    else:
        print("not saved: give -o PATH (.pkl, .json or .vnmodel) to keep the pruned network")
    return 0


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("amc-compress")
    except PackageNotFoundError:
        installed = "unknown (not installed)"
    parser = argparse.ArgumentParser(prog="amc", description="Capture, inspect and compress PyTorch networks.")
    parser.add_argument("--version", action="version", version=f"amc-compress {installed}")
    parser.add_argument("--seed", type=int, help="seed Python, numpy and torch (random models, data order)")
    commands = parser.add_subparsers(dest="command", required=True)
    model_help = "torchvision model name (random weights) or saved network (.pkl/.json/.vnmodel)"
    unchecked_help = "load a hand-edited .json without checking its digests (the schema is still checked)"
    size_help = "example input shape for a torchvision model, batch dim included, comma-separated (N,C,H,W)"

    inspect = commands.add_parser("inspect", help="print a network's node table (op, shape, params, MACs)")
    inspect.add_argument("model", help=model_help)
    inspect.add_argument("--input-size", type=_input_size, default=(1, 3, 224, 224), help=size_help)
    inspect.add_argument("--draw", metavar="PATH", help="also draw the graph (.svg, .pdf, .png or .dot)")
    inspect.add_argument("--unchecked", action="store_true", help=unchecked_help)
    inspect.set_defaults(run=inspect_command)

    prune = commands.add_parser("prune", help="remove channels and save the smaller network")
    prune.add_argument("model", help=model_help)
    prune.add_argument("--input-size", type=_input_size, default=(1, 3, 224, 224), help=size_help)
    target = prune.add_mutually_exclusive_group()
    target.add_argument("--channel-ratio", type=float, default=0.5, help="fraction of each group's channels to remove")
    target.add_argument("--flops-target", type=float, help="prune until MACs are at most this fraction")
    prune.add_argument("--importance", default="l2", choices=("l1", "l2", "random"), help="channel importance")
    prune.add_argument("--round-to", type=int, help="keep channel counts at multiples of this")
    prune.add_argument("--global-ranking", action="store_true", help="rank channels across groups")
    prune.add_argument("--ignore", nargs="*", default=[], metavar="NODE", help="node names whose groups stay intact")
    prune.add_argument("--unchecked", action="store_true", help=unchecked_help)
    prune.add_argument("--max-groups", type=int, default=40, help="rows of the group table to print")
    prune.add_argument("-o", "--output", help="where to save the pruned network (.pkl, .json or .vnmodel)")
    prune.set_defaults(run=prune_command)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``amc`` console script; returns the exit status (2 for bad input)."""
    args = _parser().parse_args(argv)
    seed_everything(args.seed)
    try:
        return args.run(args)
    except (ValueError, OSError, GraphError) as error:
        print(f"amc: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
