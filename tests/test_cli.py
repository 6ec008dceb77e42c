"""The ``amc`` command line."""
import re

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from amc.cli import main
from graph import load


def _flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def test_inspect_prints_every_node_and_the_models_parameter_count(capsys):
    assert main(["inspect", "resnet18", "--input-size", "1,3,64,64"]) == 0
    out = capsys.readouterr().out
    expected = sum(p.numel() for p in torchvision.models.resnet18(weights=None).parameters())
    assert f"{expected:,d}" in out
    assert "layer1.0.conv1" in out


def test_inspect_draw_writes_the_graph_of_a_saved_network(tmp_path, capsys):
    assert main(["prune", "resnet18", "--input-size", "1,3,32,32", "--channel-ratio", "0.5",
                 "-o", str(tmp_path / "small.pkl")]) == 0
    capsys.readouterr()
    target = tmp_path / "small.dot"
    assert main(["inspect", str(tmp_path / "small.pkl"), "--draw", str(target)]) == 0
    assert f"graph drawn to {target}" in capsys.readouterr().out
    source = target.read_text()
    assert "layer1.0.conv1" in source and "->" in source


def test_inspect_of_an_unknown_model_exits_2_naming_it(capsys):
    assert main(["inspect", "no_such_net"]) == 2
    assert "no_such_net" in capsys.readouterr().err


def test_prune_saves_a_smaller_network_and_prints_its_true_parameter_count(tmp_path, capsys):
    path = tmp_path / "small.vnmodel"
    assert main(["prune", "resnet18", "--input-size", "1,3,64,64", "--channel-ratio", "0.5", "--round-to", "8",
                 "-o", str(path)]) == 0
    out = capsys.readouterr().out
    small = load(path)
    params = sum(p.numel() for p in small.parameters())
    assert re.search(rf"params\s+11,689,512\s+{params:,d}", out)
    convs = [m for m in small.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 for m in convs)
    assert small(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_prune_to_a_flops_target_halves_the_multiply_adds(tmp_path, capsys):
    path = tmp_path / "small.json"
    assert main(["prune", "mobilenet_v2", "--input-size", "1,3,64,64", "--flops-target", "0.5", "-o", str(path)]) == 0
    x = torch.randn(1, 3, 64, 64)
    original = _flops(torchvision.models.mobilenet_v2(weights=None).eval(), x)
    pruned = _flops(load(path), x)
    assert 0.4 < pruned / original <= 0.5


def test_prune_with_an_unknown_output_suffix_exits_2_naming_the_suffixes(tmp_path, capsys):
    assert main(["prune", "resnet18", "--input-size", "1,3,32,32", "-o", str(tmp_path / "x.bin")]) == 2
    assert ".vnmodel" in capsys.readouterr().err
