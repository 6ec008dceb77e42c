"""``amc compress``: the default run (digits, channel pruning, fine-tuning) and its saved files, other methods from
the registry, and bad arguments that fail before any work."""
import json
import os

import numpy as np
import pytest
import torch

from amc.cli import main
from graph.pruning import multiply_adds
from graph.serialization import load
from trainers.datasets import load_dataset


def test_default_run_halves_the_macs_keeps_accuracy_and_writes_every_format(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--seed", "0", "compress", "-o", os.fspath(out)]) == 0
    printed = capsys.readouterr().out
    assert "MACs" in printed and "CPU latency" in printed and "test top-1" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "channel-pruning" and report["data"] == "digits"
    original_macs, compressed_macs = report["macs"]
    assert abs(compressed_macs / original_macs - 0.5) <= 0.025
    assert report["top1"][1] >= report["top1"][0] - 0.05 and report["top1_after_finetune"] >= 0.9
    network = load(os.fspath(out / "compressed.pkl"))
    assert multiply_adds(network) == compressed_macs
    images = next(iter(load_dataset("digits").test))[0][:8]
    expected = network.eval()(images).detach()
    for name in ("compressed.json", "compressed.vnmodel"):
        assert torch.allclose(load(os.fspath(out / name)).eval()(images), expected, atol=1e-5), name
    import onnxruntime

    session = onnxruntime.InferenceSession(os.fspath(out / "compressed.onnx"))
    feed = {session.get_inputs()[0].name: images[:1].numpy()}
    assert np.allclose(session.run(None, feed)[0], expected[:1].numpy(), atol=1e-4)
    assert any(name.startswith("compressed.") and name.endswith((".svg", ".dot")) for name in os.listdir(out))


def test_another_method_from_the_registry_runs_without_saving(capsys):
    assert main(["compress", "--model", "vgg-small", "--method", "l1", "--train-epochs", "1",
                 "--finetune-epochs", "0", "--speedup", "3"]) == 0
    printed = capsys.readouterr().out
    assert "l1 on vgg-small" in printed and "not saved" in printed
    macs_row = next(line for line in printed.splitlines() if line.startswith("MACs"))
    assert float(macs_row.split()[-1]) <= 1 / 3


def test_bad_arguments_fail_before_any_work(tmp_path, capsys):
    assert main(["compress", "-o", os.fspath(tmp_path / "missing" / "out")]) == 2
    assert "output directory does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["compress", "-o", os.fspath(tmp_path / "file")]) == 2
    assert "must be a directory" in capsys.readouterr().err
    for argv in (["compress", "--speedup", "1"], ["compress", "--method", "nope"],
                 ["compress", "--calibration-ratio", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert main(["compress", "--model", "missing.pkl"]) == 2
    assert "file not found" in capsys.readouterr().err
