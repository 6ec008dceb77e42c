"""The ``amc`` command line."""
import torchvision

from amc.cli import main


def test_inspect_prints_every_node_and_the_models_parameter_count(capsys):
    assert main(["inspect", "resnet18", "--input-size", "1,3,64,64"]) == 0
    out = capsys.readouterr().out
    expected = sum(p.numel() for p in torchvision.models.resnet18(weights=None).parameters())
    assert f"{expected:,d} parameters" in out
    assert "layer1.0.conv1" in out


def test_inspect_of_an_unknown_model_exits_2_naming_it(capsys):
    assert main(["inspect", "no_such_net"]) == 2
    assert "no_such_net" in capsys.readouterr().err
