"""Damaged and hostile saved networks: every change to a file either loads the identical network or raises a
FileFormatError naming the file, never a silently different network nor another exception (graph.serialization)."""
from __future__ import annotations

import io
import json
import os
import random
import zipfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graph import FileFormatError, capture
from graph.serialization import load, load_bytes
from graph.serialization.graph_text import canonical_graph
from graph.serialization.spec import network_to_spec

SAVERS = {
    "pkl": lambda net, path: net.save(pkl=path),
    "json": lambda net, path: net.save_to_json(file=path),
    "vnmodel": lambda net, path: net.save_to_vnmodel(pkl=path, model_base_size_hw=(4, 4), model_id=5),
}


class Tiny(nn.Module):
    """A linear layer, a function, a size read at replay ($sym), a guard and a frozen buffer: every part of a spec."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("scale", torch.tensor([2.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.fc(x)) * self.scale
        if x.shape[1] == 3:
            y = y + 1
        return y.view(y.size(0), -1)


def tiny_network() -> nn.Module:
    torch.manual_seed(0)
    return capture(Tiny().eval(), torch.randn(2, 3))


def fingerprint(network: nn.Module) -> tuple[bytes, dict[str, torch.Tensor], torch.Tensor]:
    """What makes two networks the same: the spec the saver writes for it, its tensors and its output on an input."""
    spec, tensors = network_to_spec(network)
    with torch.no_grad():
        output = network(torch.linspace(-2, 2, 12).reshape(4, 3))
    return canonical_graph(spec), tensors, output


def same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(
        a[1][k].dtype == b[1][k].dtype and a[1][k].shape == b[1][k].shape
        and a[1][k].view(torch.uint8).equal(b[1][k].view(torch.uint8)) for k in a[1]) and torch.equal(a[2], b[2])


def outcome(content: bytes, reference: tuple) -> str:
    """``identical``, ``FileFormatError``, or what went wrong (a silent difference or another exception)."""
    try:
        loaded = load_bytes(content, "damaged.bin")
    except FileFormatError as error:
        return "FileFormatError" if str(error).startswith("damaged.bin: ") else f"unnamed FileFormatError: {error}"
    except Exception as error:  # noqa: BLE001 - any other exception type is what this test looks for
        return f"{type(error).__name__}: {error}"
    return "identical" if same(fingerprint(loaded), reference) else "silently different"


@pytest.mark.parametrize("fmt", SAVERS)
def test_flipping_any_byte_loads_the_identical_network_or_raises_file_format_error(fmt, tmp_path):
    network = tiny_network()
    reference = fingerprint(network)
    data = open(SAVERS[fmt](network, tmp_path / "net.bin"), "rb").read()
    rng = random.Random(13)
    counts: dict[str, int] = {}
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 1 << rng.randrange(8)
        result = outcome(bytes(damaged), reference)
        counts[result] = counts.get(result, 0) + 1
        assert result in ("identical", "FileFormatError"), f"byte {position}: {result}"
    print(f"\n{fmt}: {len(data)} bytes flipped: {counts}")
    assert counts["FileFormatError"] > len(data) // 2
