"""Layer statistics for data-driven compressors (compressors/features.py): sampled rows reproduce each layer's own
computation, targets can come from another network, bad input is refused."""
import pytest
import torch
import torch.nn as nn

from compressors.base import CompressionError
from compressors.features import collect_layer_statistics, sample_positions
from graph import capture


class ConvAndTokens(nn.Module):
    """A strided dilated conv with reflect padding, a plain conv, then a Linear applied per token."""

    def __init__(self):
        super().__init__()
        self.strided = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(5, 4, (3, 2), padding=(2, 1), dilation=2, padding_mode="reflect")
        self.tokens = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dilated(torch.relu(self.strided(x)))
        return self.tokens(y.flatten(2).transpose(1, 2))


def _weights_with_bias(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().reshape(module.weight.shape[0], -1)
    return torch.cat([weight, module.bias.detach()[:, None]], dim=1).double().T


def test_sampled_rows_reproduce_every_layer_exactly():
    torch.manual_seed(0)
    model = ConvAndTokens().eval()
    inputs = [torch.randn(4, 3, 9, 9) for _ in range(3)]
    network = capture(model, inputs[0])
    stats = collect_layer_statistics(network, ["strided", "dilated", "tokens"], inputs, samples_per_example=7,
                                     append_ones=True, targets_gram=True)
    for name in ("strided", "dilated", "tokens"):
        expected = _weights_with_bias(getattr(model, name))
        solved = torch.linalg.lstsq(stats[name].xtx, stats[name].xty).solution
        assert torch.allclose(solved, expected, atol=1e-5), name
        assert stats[name].count == 3 * 4 * 7
        assert stats[name].error(expected) == pytest.approx(0.0, abs=1e-6 * stats[name].energy)
        assert float(stats[name].yty.trace()) == pytest.approx(stats[name].energy)


def test_targets_come_from_the_reference_network_at_the_same_positions():
    torch.manual_seed(0)
    model = ConvAndTokens().eval()
    reference = capture(model, torch.randn(2, 3, 9, 9))
    changed = ConvAndTokens().eval()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.dilated.weight.mul_(0.5)
    network = capture(changed, torch.randn(2, 3, 9, 9))
    inputs = [torch.randn(2, 3, 9, 9) for _ in range(4)]
    stats = collect_layer_statistics(network, ["dilated"], inputs, reference=reference, samples_per_example=5,
                                     append_ones=True)["dilated"]
    # The inputs of "dilated" are the same in both networks, so regressing the reference's outputs on them gives
    # the reference's weights, not the changed network's.
    solved = torch.linalg.lstsq(stats.xtx, stats.xty).solution
    assert torch.allclose(solved, _weights_with_bias(model.dilated), atol=1e-5)


def test_positions_are_distinct_and_all_taken_when_there_are_few():
    generator = torch.Generator().manual_seed(0)
    index = sample_positions(3, 50, 10, generator, torch.device("cpu"))
    assert index.shape == (3, 10) and all(len(set(row.tolist())) == 10 for row in index)
    assert sample_positions(2, 4, 10, generator, torch.device("cpu")).tolist() == [[0, 1, 2, 3]] * 2


def test_bad_nodes_and_non_finite_features_are_refused():
    model = ConvAndTokens().eval()
    network = capture(model, torch.randn(2, 3, 9, 9))
    with pytest.raises(CompressionError, match="not a node"):
        collect_layer_statistics(network, ["nope"], [torch.randn(2, 3, 9, 9)])
    with pytest.raises(CompressionError, match="cannot be unfolded|not a layer"):
        collect_layer_statistics(network, ["transpose"], [torch.randn(2, 3, 9, 9)])
    with pytest.raises(CompressionError, match="NaN or inf"):
        collect_layer_statistics(network, ["strided"], [torch.full((2, 3, 9, 9), float("nan"))])
    with pytest.raises(CompressionError, match="no calibration batches"):
        collect_layer_statistics(network, ["strided"], [])
