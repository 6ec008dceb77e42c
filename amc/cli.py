"""The ``amc`` command line: ``amc inspect MODEL`` prints a captured network's node table."""
from __future__ import annotations

import argparse
import sys

import torch


def _load_network(model: str, input_size: tuple[int, ...]):
    import os

    if os.path.exists(model):
        from graph.serialization import load

        return load(model)
    import torchvision

    from graph import capture

    if model not in torchvision.models.list_models():
        raise ValueError(f"unknown model {model!r}: give a torchvision model name or a saved network file")
    network = torchvision.models.get_model(model, weights=None).eval()
    return capture(network, torch.randn(*input_size))


def inspect_command(args: argparse.Namespace) -> int:
    """Print every node (name, op, output shape, parameters) with totals."""
    rnet = _load_network(args.model, tuple(int(s) for s in args.input_size.split(",")))
    print(f"{'node':40s} {'op':36s} {'output shape':24s} {'params':>12s}")
    total = 0
    for node in rnet.layer_nodes:
        module = rnet.module_of(node)
        params = sum(p.numel() for p in module.parameters(recurse=True)) if node.op not in ("input",) else 0
        total += params
        print(f"{node.name[:40]:40s} {node.op[:36]:36s} {str(node.out_shape)[:24]:24s} {params:12,d}")
    unique = sum(p.numel() for p in rnet.parameters())
    print(f"{len(rnet.layer_nodes)} nodes, {unique:,d} parameters")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``amc`` console script."""
    parser = argparse.ArgumentParser(prog="amc", description="Capture, inspect and compress PyTorch networks.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print a network's node table")
    inspect.add_argument("model", help="torchvision model name or saved network (.pkl/.json/.vnmodel)")
    inspect.add_argument("--input-size", default="1,3,224,224", help="example input shape, comma-separated")
    inspect.set_defaults(run=inspect_command)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"amc: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
