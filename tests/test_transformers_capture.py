"""Capture of Hugging Face transformers: exact replay at other batch sizes and sequence lengths, with and without
padding, in eager and sdpa attention, output structures, caches, train mode, and the errors for what cannot replay.

Every check compares the captured network against the original transformers model run on the same input.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from graph import capture
from graph.capture import iter_tensors
from graph.errors import CaptureError, ReplayError

from hf_models import ATTENTION_IMPLEMENTATIONS, CAUSAL_FAMILIES, FAMILIES, TEXT_FAMILIES, image_inputs, token_inputs

REPLAY_SHAPES = [(1, 7, False), (3, 33, True), (3, 7, True), (1, 33, False)]


def _text_kwargs(family: str) -> dict:
    return {"use_cache": False} if family in CAUSAL_FAMILIES else {}


def _assert_same_output(expected, actual) -> None:
    assert type(actual) is type(expected)
    if isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys())
    expected_tensors, actual_tensors = list(iter_tensors(expected)), list(iter_tensors(actual))
    assert [path for path, _ in actual_tensors] == [path for path, _ in expected_tensors]
    for (path, want), (_, got) in zip(expected_tensors, actual_tensors):
        assert got.shape == want.shape, path
        scale = want.abs().max().clamp_min(1e-12)
        assert ((got - want).abs().max() / scale).item() <= 1e-5, path


# Only sdpa looks at whether the mask has padding (to skip it), so only sdpa is also captured with an unpadded mask.
@pytest.mark.parametrize("attn, capture_padded", [("eager", True), ("sdpa", True), ("sdpa", False)],
                         ids=["eager", "sdpa", "sdpa-captured-unpadded"])
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_replay_matches_original_at_other_batch_and_length(family, attn, capture_padded):
    model = FAMILIES[family](attn)
    kwargs = _text_kwargs(family)
    input_ids, mask = token_inputs(2, 16, padded=capture_padded)
    network = capture(model, input_ids, attention_mask=mask, **kwargs)
    with torch.no_grad():
        for batch, length, padded in REPLAY_SHAPES:
            input_ids, mask = token_inputs(batch, length, padded, seed=batch * 100 + length)
            _assert_same_output(model(input_ids, attention_mask=mask, **kwargs),
                                network(input_ids, attention_mask=mask, **kwargs))


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
def test_vit_replay_matches_original_at_other_batch_size(attn):
    model = FAMILIES["vit"](attn)
    network = capture(model, image_inputs(2))
    with torch.no_grad():
        for batch in (1, 3):
            pixels = image_inputs(batch, seed=batch)
            _assert_same_output(model(pixels), network(pixels))


def test_vit_replay_at_other_image_size_raises_replay_error():
    model = FAMILIES["vit"]("sdpa")
    network = capture(model, image_inputs(2))
    with pytest.raises(ValueError, match="doesn't match model"):
        model(image_inputs(1, size=48))
    with pytest.raises(ReplayError, match="modeling_vit"):
        network(image_inputs(1, size=48))


def test_vit_with_interpolated_positions_replays_at_other_image_sizes():
    model = FAMILIES["vit"]("sdpa")
    network = capture(model, image_inputs(2, size=48), interpolate_pos_encoding=True)
    with torch.no_grad():
        for size in (40, 64):
            pixels = image_inputs(3, size=size, seed=size)
            _assert_same_output(model(pixels, interpolate_pos_encoding=True),
                                network(pixels, interpolate_pos_encoding=True))
    with pytest.raises(ReplayError, match="interpolate_pos_encoding"):
        network(image_inputs(1, size=32), interpolate_pos_encoding=True)


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_capture_without_mask_replays_at_other_length_without_mask(family, attn):
    model = FAMILIES[family](attn)
    network = capture(model, token_inputs(2, 16, padded=False)[0], use_cache=False)
    input_ids, _ = token_inputs(3, 33, padded=False)
    with torch.no_grad():
        _assert_same_output(model(input_ids, use_cache=False), network(input_ids, use_cache=False))


def test_mask_given_at_replay_to_network_captured_without_one_raises_replay_error():
    network = capture(FAMILIES["llama"]("sdpa"), token_inputs(2, 16, padded=False)[0], use_cache=False)
    input_ids, mask = token_inputs(2, 16, padded=True)
    with pytest.raises(ReplayError, match="attention_mask was None when captured"):
        network(input_ids, attention_mask=mask, use_cache=False)


def test_llama_without_mask_at_batch_one_raises_replay_error_naming_the_branch():
    # Llama expands position ids only when the batch differs from theirs (1): a branch taken at batch 2 only.
    network = capture(FAMILIES["llama"]("eager"), token_inputs(2, 16, padded=False)[0], use_cache=False)
    with pytest.raises(ReplayError, match="masking_utils"):
        network(token_inputs(1, 16, padded=False)[0], use_cache=False)


def test_hidden_states_and_attentions_come_back_as_tuples_of_the_same_length():
    model = FAMILIES["llama"]("eager")
    kwargs = {"use_cache": False, "output_hidden_states": True, "output_attentions": True}
    input_ids, mask = token_inputs(2, 16, padded=True)
    network = capture(model, input_ids, attention_mask=mask, **kwargs)
    input_ids, mask = token_inputs(3, 9, padded=True)
    with torch.no_grad():
        expected, actual = model(input_ids, attention_mask=mask, **kwargs), network(input_ids, attention_mask=mask,
                                                                                    **kwargs)
    assert set(expected.keys()) == {"logits", "hidden_states", "attentions"}
    assert isinstance(actual.hidden_states, tuple) and len(actual.hidden_states) == len(expected.hidden_states) == 3
    _assert_same_output(expected, actual)


def test_return_dict_false_gives_the_same_plain_tuple():
    model = FAMILIES["bert"]("sdpa")
    input_ids, mask = token_inputs(2, 16, padded=True)
    network = capture(model, input_ids, attention_mask=mask, return_dict=False)
    input_ids, mask = token_inputs(1, 7, padded=False)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask, return_dict=False)
        actual = network(input_ids, attention_mask=mask, return_dict=False)
    assert type(expected) is tuple and len(expected) == 2
    _assert_same_output(expected, actual)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_use_cache_default_raises_capture_error_pointing_to_use_cache_false(family):
    model = FAMILIES[family]("sdpa")
    input_ids, mask = token_inputs(2, 16, padded=False)
    assert model(input_ids, attention_mask=mask).past_key_values is not None
    with pytest.raises(CaptureError, match=r"DynamicCache object at output\['cache'\].*use_cache=False"):
        capture(model, input_ids, attention_mask=mask)
    assert not torch.compiler.is_exporting()


def _gradients_by_original_name(network: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients keyed by the original model's parameter names (a tied parameter under its first user's name)."""
    grads, seen = {}, set()
    for node in network.layer_nodes:
        if node.key is None:
            continue
        for name, parameter in network.module_of(node).named_parameters():
            if parameter.grad is not None and id(parameter) not in seen:
                seen.add(id(parameter))
                grads[node.name if node.op == "param" else f"{node.name}.{name}"] = parameter.grad
    return grads


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_train_mode_with_dropout_gives_same_outputs_and_gradients_for_same_seed(family, attn):
    model = FAMILIES[family](attn, dropout=0.2).train()
    input_ids, mask = token_inputs(2, 16, padded=True)
    network = capture(model, input_ids, attention_mask=mask, use_cache=False)
    assert network.training
    input_ids, mask = token_inputs(3, 9, padded=True, seed=5)
    logits = []
    for net in (model, network):
        torch.manual_seed(123)
        out = net(input_ids, attention_mask=mask, use_cache=False).logits
        out.square().mean().backward()
        logits.append(out.detach())
    torch.manual_seed(124)
    other_seed = model(input_ids, attention_mask=mask, use_cache=False).logits.detach()
    assert not torch.allclose(other_seed, logits[0]), "dropout must be active for this test to mean anything"
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-6)
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    actual = _gradients_by_original_name(network)
    assert set(actual) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("attn", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_captured_in_eval_replays_train_mode_dropout_like_the_original(family, attn):
    model = FAMILIES[family](attn, dropout=0.2).eval()
    input_ids, mask = token_inputs(2, 16, padded=True)
    network = capture(model, input_ids, attention_mask=mask, use_cache=False)
    assert not network.training
    model.train()
    network.train()
    input_ids, mask = token_inputs(3, 9, padded=True, seed=5)
    logits = []
    for net in (model, network):
        torch.manual_seed(7)
        logits.append(net(input_ids, attention_mask=mask, use_cache=False).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-6)
    model.eval()
    network.eval()
    eval_logits = model(input_ids, attention_mask=mask, use_cache=False).logits
    assert not torch.allclose(eval_logits, logits[0]), "dropout must be active in train mode"
    torch.testing.assert_close(network(input_ids, attention_mask=mask, use_cache=False).logits, eval_logits,
                               rtol=1e-5, atol=1e-6)


class _ArangeLength(nn.Module):
    """Reads Python values from tensors built from sizes only: a traced ``.item()`` and a branch on ``.all()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1])
        last = positions.max().item()
        if (positions >= 0).all():
            x = x + 1
        return x[:, : last + 1] * positions


class _BranchOnShortSequences(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if (torch.arange(x.shape[1]) < 8).all() else x


def test_value_read_from_a_size_only_tensor_replays_at_other_length():
    network = capture(_ArangeLength(), torch.randn(2, 5))
    x = torch.randn(3, 11)
    torch.testing.assert_close(network(x), _ArangeLength()(x))


def test_branch_on_a_size_only_tensor_raises_replay_error_when_it_flips():
    network = capture(_BranchOnShortSequences(), torch.randn(2, 5))
    x = torch.randn(1, 7)
    torch.testing.assert_close(network(x), x * 2)
    with pytest.raises(ReplayError, match="replay diverges"):
        network(torch.randn(1, 9))


def test_branch_on_input_data_still_raises_capture_error():
    class BranchOnData(nn.Module):
        def forward(self, x):
            return x * 2 if (x > 0).all() else x

    with pytest.raises(CaptureError, match="data-dependent control flow"):
        capture(BranchOnData(), torch.ones(2, 3))


def test_vmap_in_forward_raises_capture_error_naming_the_transform():
    class Vmapped(nn.Module):
        def forward(self, x):
            return torch.vmap(lambda row: row * row.sum())(x)

    with pytest.raises(CaptureError, match="torch.func transform"):
        capture(Vmapped(), torch.randn(2, 4))
    assert not torch.compiler.is_exporting()


def test_capture_at_batch_one_replays_another_batch_like_a_capture_at_two():
    model = FAMILIES["llama"]("eager").eval()
    other, _ = token_inputs(3, 7, padded=False, seed=4)
    for batch in (1, 2):
        input_ids, _ = token_inputs(batch, 16, padded=False)
        network = capture(model, input_ids, use_cache=False)
        torch.testing.assert_close(network(other, use_cache=False).logits, model(other, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-6)
