"""What capture refuses and what replay refuses: each error names the op or the guard and the user's source line.

Capture raises :class:`CaptureError` for ops it cannot replay (off the allow-list, data-dependent control flow,
custom autograd Functions). Replay raises :class:`ReplayError` when the input would make the forward's Python code
take another path than it took during capture (a shape-dependent branch, a loop over a size, ``self.training``),
and replays exactly when it would take the same path.
"""
from __future__ import annotations

import builtins
import os

import pytest
import torch
import torch.nn as nn

from graph import capture
from graph.errors import CaptureError, ReplayError

from models import assert_outputs_close

THIS_FILE = os.path.basename(__file__)


def _line_of(snippet: str) -> str:
    """``test_capture_errors.py:<line>`` of the only line of this file that contains ``snippet`` after its indent."""
    with open(__file__) as handle:
        lines = [i for i, line in enumerate(handle, start=1) if line.strip().startswith(snippet)]
    assert len(lines) == 1, snippet
    return f"{THIS_FILE}:{lines[0]}"


class UnsupportedOpNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        return torch._foreach_add([y], 1.0)[0]


class DataDependentBranchNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class CustomFunctionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(Square.apply(self.linear(x)))


class ShapeBranchNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 32:
            return torch.nn.functional.avg_pool2d(x, 2)
        return x * 3


class TrainingBranchNet(nn.Module):
    """Its train-mode branch cannot run on any input (BatchNorm over one averaged row), so only eval mode captures."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.norm(self.linear(x).mean(0, keepdim=True))
        return self.linear(x)


class PerSampleLoopNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(x.shape[0]):
            rows.append(x[i] * (i + 1))
        return torch.stack(rows)


def test_unsupported_op_raises_naming_the_op_and_the_source_line():
    with pytest.raises(CaptureError) as error:
        capture(UnsupportedOpNet(), torch.randn(2, 3))
    assert "_foreach_add" in str(error.value)
    assert _line_of("return torch._foreach_add") in str(error.value)


def test_data_dependent_branch_raises_naming_the_branch_line():
    with pytest.raises(CaptureError) as error:
        capture(DataDependentBranchNet(), torch.randn(2, 3))
    assert _line_of("if x.sum() > 0:") in str(error.value)
    assert "data-dependent" in str(error.value)


def test_custom_autograd_function_raises_naming_it():
    with pytest.raises(CaptureError) as error:
        capture(CustomFunctionNet(), torch.randn(2, 4))
    assert "Square" in str(error.value)
    assert _line_of("return self.linear(Square.apply") in str(error.value)


def test_custom_autograd_function_under_no_grad_raises_too_and_apply_is_restored():
    apply = torch.autograd.Function.__dict__["apply"]
    with torch.no_grad(), pytest.raises(CaptureError, match="custom autograd Function Square"):
        capture(CustomFunctionNet(), torch.randn(2, 4))
    assert torch.autograd.Function.__dict__["apply"] is apply
    x = torch.randn(3, requires_grad=True)
    Square.apply(x).sum().backward()
    assert torch.allclose(x.grad, 2 * x)


def test_shape_branch_replays_exactly_while_the_branch_is_the_same():
    model = ShapeBranchNet()
    net = capture(model, torch.randn(1, 2, 16, 16))
    x = torch.randn(3, 2, 20, 24)
    assert_outputs_close(model(x), net(x))


def test_shape_branch_taking_the_other_way_raises_replay_error_naming_the_line():
    net = capture(ShapeBranchNet(), torch.randn(1, 2, 16, 16))
    with pytest.raises(ReplayError) as error:
        net(torch.randn(1, 2, 40, 40))
    assert _line_of("if x.shape[-1] > 32:") in str(error.value)


def test_training_branch_that_cannot_run_at_capture_raises_when_replayed_in_train_mode():
    model = TrainingBranchNet().eval()
    net = capture(model, torch.randn(2, 4))
    x = torch.randn(5, 4)
    assert_outputs_close(model(x), net(x))
    net.train()
    with pytest.raises(ReplayError) as error:
        net(x)
    assert _line_of("if self.training:") in str(error.value)
    assert "training" in str(error.value)


def test_range_over_a_size_guards_the_loop_length():
    model = PerSampleLoopNet()
    net = capture(model, torch.randn(2, 3))
    x = torch.randn(2, 5)
    assert_outputs_close(model(x), net(x))
    with pytest.raises(ReplayError) as error:
        net(torch.randn(3, 3))
    assert _line_of("for i in range(x.shape[0]):") in str(error.value)


def test_failed_capture_leaves_no_hooks_and_restores_range():
    model = CustomFunctionNet()
    with pytest.raises(CaptureError):
        capture(model, torch.randn(2, 4))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert isinstance(builtins.range, type)
    assert torch.overrides._get_current_function_mode_stack() == []


def test_non_module_model_raises_type_error():
    with pytest.raises(TypeError, match="nn.Module"):
        capture(lambda x: x, torch.randn(1))
