"""ONNX export of captured networks (graph.onnx_export), checked by running the file with onnxruntime."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn
import torchvision

from graph import capture

TOLERANCE = 1e-4


class SplitCatView(nn.Module):
    """Conv, split, cat, a view built from traced sizes, and two outputs (one of them a scalar)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        y = self.conv(x)
        a, b = torch.split(y, 4, dim=1)
        z = torch.cat([b, a * 2], dim=1)
        z = z.view(z.size(0), 2, -1, z.shape[2], z.shape[3]).sum(1)
        return self.head(z.flatten(1)), a.mean()


def run_onnx(path: str, *inputs: torch.Tensor) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})


def assert_close(onnx_outputs: list[np.ndarray], expected) -> None:
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(onnx_outputs) == len(expected)
    for got, want in zip(onnx_outputs, expected):
        np.testing.assert_allclose(got, want.numpy(), atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("build", [torchvision.models.resnet18, torchvision.models.mobilenet_v2],
                         ids=["resnet18", "mobilenet_v2"])
def test_onnx_from_captured_shapes_matches_the_model_at_two_batch_sizes(build, tmp_path):
    torch.manual_seed(0)
    model = build(weights=None).eval()
    network = capture(model, torch.randn(1, 3, 64, 64))
    path = network.export_onnx(str(tmp_path / "net.onnx"))
    assert os.listdir(tmp_path) == ["net.onnx"]
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            assert_close(run_onnx(path, x), model(x))


@pytest.mark.parametrize("dynamo", [False, True], ids=["tracing_exporter", "dynamo_exporter"])
def test_onnx_of_split_cat_view_net_keeps_the_batch_dynamic(dynamo, tmp_path):
    torch.manual_seed(0)
    model = SplitCatView().eval()
    network = capture(model, torch.randn(2, 3, 8, 8))
    path = network.export_onnx(str(tmp_path / "net.onnx"), torch.randn(2, 3, 8, 8), dynamo=dynamo)
    for batch in (2, 5):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            assert_close(run_onnx(path, x), model(x))


def test_onnx_without_dynamic_batch_has_fixed_input_shape(tmp_path):
    network = capture(SplitCatView().eval(), torch.randn(2, 3, 8, 8))
    path = network.export_onnx(str(tmp_path / "net.onnx"), dynamic_batch=False, opset=17)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 8, 8]
    assert onnx.load(path).opset_import[0].version == 17
