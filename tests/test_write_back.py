"""Writing a pruning plan back into the user's original model (``graph.write_back.apply_plan``).

The pruned copy is checked against computations that do not go through write-back: the masked network
(``mask_channels``, equal to hard pruning for channel-wise groups), the original transformers model with the removed
heads' and MLP channels' output-projection columns zeroed, shapes derived by hand from the config, a greedy argmax
loop over the pruned captured network, and ``from_pretrained`` of what ``save_pretrained`` wrote.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from graph import capture
from graph.errors import PruningError
from graph.pruning import plan_by_ratio
from graph.write_back import apply_plan


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= rtol * expected.abs().max().item()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_copy_is_the_same_class_smaller_and_equals_the_masked_network(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    before = _state(model)
    x = torch.randn(2, 3, 32, 32)
    rnet = capture(model, x)
    plan = plan_by_ratio(rnet, 0.3)
    pruned = apply_plan(model, rnet, plan, inputs=((x,), {}))
    assert type(pruned) is type(model)
    assert list(pruned.state_dict()) == list(model.state_dict())
    assert sum(p.numel() for p in pruned.parameters()) < 0.75 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        _assert_close(pruned(torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))),
                      rnet.mask_channels(plan)(torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))))
    assert all(conv.out_channels == conv.weight.shape[0] and conv.in_channels == conv.weight.shape[1] * conv.groups
               for conv in pruned.modules() if isinstance(conv, nn.Conv2d))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in pruned.parameters())


def test_pruned_detector_backbone_runs_inside_the_whole_detector():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    detector = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).eval()
    before = _state(detector)
    rnet = capture(detector.backbone, torch.randn(1, 3, 320, 320))
    plan = plan_by_ratio(rnet, 0.3)
    assert plan, "the backbone has prunable internal groups"
    x = torch.randn(1, 3, 96, 96)
    pruned = apply_plan(detector, rnet, plan, root="backbone", inputs=((x,), {}))
    assert type(pruned) is type(detector)
    body = sum(p.numel() for p in pruned.backbone.body.parameters())
    assert body < 0.8 * sum(p.numel() for p in detector.backbone.body.parameters())
    with torch.no_grad():
        features, masked = pruned.backbone(x), rnet.mask_channels(plan)(x)
        assert list(features) == list(masked)
        for key in features:
            assert features[key].shape[1] == detector.backbone.out_channels
            _assert_close(features[key], masked[key])
        detections = pruned([torch.rand(3, 120, 160)])
    assert len(detections) == 1 and set(detections[0]) == {"boxes", "labels", "scores"}
    boxes, labels, scores = (detections[0][k] for k in ("boxes", "labels", "scores"))
    assert boxes.shape == (len(labels), 4) and scores.shape == (len(labels),)
    assert labels.dtype == torch.int64 and bool(torch.isfinite(boxes).all())
    assert all(torch.equal(before[k], v) for k, v in detector.state_dict().items())


hf_models = pytest.importorskip("hf_models") if pytest.importorskip("transformers") else None
HEADS, INTERMEDIATE, HEAD_DIM, LAYERS = hf_models.HEADS, hf_models.INTERMEDIATE, hf_models.HIDDEN // 4, 2


def _attention_and_mlp_groups(rnet, o_proj: str, down_proj: str) -> list[tuple]:
    """Per layer ``(group, member, model path)`` of the head group and the MLP group, found by their output
    projections' input dims."""
    found = []
    for layer in range(LAYERS):
        for path in (o_proj.format(i=layer), down_proj.format(i=layer)):
            found += [(g, m, path) for g in rnet.channel_groups() for m in g.members
                      if (m.node, m.tensor, m.dim) == (path, "weight", 1)]
    return found


def test_llama_copy_equals_the_masked_original_round_trips_and_generates_the_greedy_tokens(tmp_path):
    import transformers

    model = hf_models.llama("eager")
    before = _state(model)
    ids, _ = hf_models.token_inputs(1, 8, padded=False)
    rnet = capture(model, ids, use_cache=False)
    groups = _attention_and_mlp_groups(rnet, "model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj")
    plan = {g: list(range(0, g.size, 2)) for g, _, _ in groups}
    masked = hf_models.llama("eager")
    with torch.no_grad():
        for group, member, path in groups:
            columns = torch.as_tensor(member.positions[plan[group]].ravel())
            masked.get_submodule(path).weight.index_fill_(1, columns, 0)
    pruned = apply_plan(model, rnet, plan, inputs=((ids,), {"use_cache": False}))
    assert type(pruned) is type(model) and list(pruned.state_dict()) == list(model.state_dict())
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size, config.hidden_size,
            config.head_dim) == (HEADS // 2, HEADS // 2, INTERMEDIATE // 2, hf_models.HIDDEN, HEAD_DIM)
    assert model.config.num_attention_heads == HEADS and model.config.intermediate_size == INTERMEDIATE
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (HEADS // 2 * HEAD_DIM, hf_models.HIDDEN)
    padded, mask = hf_models.token_inputs(2, 12, padded=True)
    with torch.no_grad():
        _assert_close(pruned(padded, attention_mask=mask).logits, masked(padded, attention_mask=mask).logits)
    pruned.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    small = rnet.prune_channels(plan)
    with torch.no_grad():
        _assert_close(loaded(padded, attention_mask=mask).logits, pruned(padded, attention_mask=mask).logits)
        generated = pruned.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        greedy = ids
        for _ in range(5):
            greedy = torch.cat([greedy, small(greedy, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, greedy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_qwen2_grouped_query_heads_rewrite_both_head_counts_in_the_config():
    model = hf_models.qwen2("eager")
    ids, _ = hf_models.token_inputs(2, 8, padded=False)
    rnet = capture(model, ids, use_cache=False)
    groups = _attention_and_mlp_groups(rnet, "model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj")
    plan = {g: [0] for g, _, _ in groups}
    pruned = apply_plan(model, rnet, plan, inputs=((ids,), {"use_cache": False}))
    # Two key/value heads shared by two query heads each: one kv head goes with its two query heads.
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 1)
    assert pruned.config.intermediate_size == INTERMEDIATE - 1
    assert pruned.model.layers[1].self_attn.num_key_value_groups == 2
    with torch.no_grad():
        _assert_close(pruned(ids).logits, rnet.prune_channels(plan)(ids, use_cache=False).logits)


def test_heads_pruned_differently_per_layer_cannot_be_written_in_the_config():
    model = hf_models.llama("eager")
    ids, _ = hf_models.token_inputs(1, 8, padded=False)
    rnet = capture(model, ids, use_cache=False)
    heads = [g for g, _, path in _attention_and_mlp_groups(rnet, "model.layers.{i}.self_attn.o_proj",
                                                           "model.layers.{i}.mlp.down_proj") if "o_proj" in path]
    with pytest.raises(PruningError, match="num_attention_heads would be .* differ between layers"):
        apply_plan(model, rnet, {heads[0]: [0], heads[1]: [0, 1]}, inputs=((ids,), {"use_cache": False}))


def test_gpt2_mlp_channels_write_back_but_heads_do_not_fit_its_config():
    model = hf_models.gpt2("eager")
    ids, _ = hf_models.token_inputs(2, 8, padded=False)
    rnet = capture(model, ids, use_cache=False)
    mlp = [g for g in rnet.channel_groups() for m in g.members
           if m.node.endswith("mlp.c_proj.weight") and m.dim == 0]
    assert len(mlp) == LAYERS
    plan = {g: list(range(INTERMEDIATE // 4)) for g in mlp}
    pruned = apply_plan(model, rnet, plan, inputs=((ids,), {"use_cache": False}))
    assert pruned.config.n_inner == INTERMEDIATE - INTERMEDIATE // 4 and pruned.config.n_head == HEADS
    with torch.no_grad():
        _assert_close(pruned(ids).logits, rnet.mask_channels(plan)(ids, use_cache=False).logits)
    heads = [g for g in rnet.channel_groups() for m in g.members
             if m.node.endswith("attn.c_proj.weight") and m.dim == 0 and g.size == HEADS]
    with pytest.raises(PruningError, match="GPT2Config cannot hold the pruned sizes"):
        apply_plan(model, rnet, {g: [0] for g in heads}, inputs=((ids,), {"use_cache": False}))


def test_gpt2_heads_write_back_with_the_config_kept_and_generate_the_greedy_tokens():
    model = hf_models.gpt2("eager")
    ids, _ = hf_models.token_inputs(1, 8, padded=False)
    rnet = capture(model, ids, use_cache=False)
    heads = [g for g in rnet.channel_groups() for m in g.members
             if m.node.endswith("attn.c_proj.weight") and m.dim == 0 and g.size == HEADS]
    plan = {heads[0]: [1], heads[1]: [0, 3]}
    pruned = apply_plan(model, rnet, plan, inputs=((ids,), {"use_cache": False}), fit_config=False)
    assert pruned.transformer.h[1].attn.c_attn.weight.shape == (hf_models.HIDDEN, 3 * 2 * HEAD_DIM)
    assert pruned.config.n_head == HEADS == model.config.n_head
    small = rnet.prune_channels(plan)
    with torch.no_grad():
        generated = pruned.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        greedy = ids
        for _ in range(5):
            greedy = torch.cat([greedy, small(greedy, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, greedy)


def test_bert_heads_written_back_with_the_config_kept_equal_the_original_with_their_columns_zeroed():
    model = hf_models.bert("eager")
    ids, mask = hf_models.token_inputs(2, 8, padded=True)
    rnet = capture(model, ids, attention_mask=mask)
    groups = _attention_and_mlp_groups(rnet, "encoder.layer.{i}.attention.output.dense",
                                       "encoder.layer.{i}.output.dense")
    heads = [(g, m, path) for g, m, path in groups if "attention" in path]
    plan = {g: [i] for i, (g, _, _) in enumerate(heads)}
    masked = hf_models.bert("eager")
    with torch.no_grad():
        for group, member, path in heads:
            columns = torch.as_tensor(member.positions[plan[group]].ravel())
            masked.get_submodule(path).weight.index_fill_(1, columns, 0)
    pruned = apply_plan(model, rnet, plan, inputs=((ids,), {"attention_mask": mask}), fit_config=False)
    assert pruned.encoder.layer[0].attention.self.query.weight.shape == ((HEADS - 1) * HEAD_DIM, hf_models.HIDDEN)
    other, other_mask = hf_models.token_inputs(3, 11, padded=True, seed=4)
    with torch.no_grad():
        _assert_close(pruned(other, attention_mask=other_mask).last_hidden_state,
                      masked(other, attention_mask=other_mask).last_hidden_state)


def test_phi3_fused_qkv_heads_fit_both_head_counts_and_round_trip(tmp_path):
    import transformers

    config = transformers.Phi3Config(vocab_size=hf_models.VOCAB, hidden_size=hf_models.HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=INTERMEDIATE,
                                     max_position_embeddings=128, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    ids, _ = hf_models.token_inputs(2, 8, padded=False)
    rnet = capture(model, ids, use_cache=False)
    heads = [g for g, _, path in _attention_and_mlp_groups(rnet, "model.layers.{i}.self_attn.o_proj",
                                                           "model.layers.{i}.mlp.down_proj") if "o_proj" in path]
    pruned = apply_plan(model, rnet, {g: [1] for g in heads}, inputs=((ids,), {"use_cache": False}))
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 1)
    assert pruned.model.layers[0].self_attn.qkv_proj.weight.shape == ((2 + 2 * 1) * HEAD_DIM, hf_models.HIDDEN)
    pruned.save_pretrained(tmp_path)
    loaded = transformers.Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        _assert_close(loaded(ids).logits, rnet.prune_channels({g: [1] for g in heads})(ids, use_cache=False).logits)


class _ChannelMean(nn.Module):
    """Averages each of ``width`` channels over space, with the width passed in by its parent."""

    def forward(self, y: torch.Tensor, width: int) -> torch.Tensor:
        return y.reshape(y.shape[0], width, -1).mean(-1)


class _FixedWidthView(nn.Module):
    """Hands a stored channel count to a child module's forward; it equals both its convolution's input and output
    width, and no op of its own forward reads it, so write-back cannot tell whether pruning the output changes it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.pool = _ChannelMean()
        self.width = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x), self.width)


class _OwnReshape(nn.Module):
    """Reads the same kind of stored width in a reshape of its own forward: the rewritten constant settles it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.width = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.reshape(y.shape[0], self.width, -1).mean(-1)


class _Net(nn.Module):
    def __init__(self, block: type = _FixedWidthView):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = block()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def test_a_size_left_unrewritten_is_reported_naming_the_module_whose_forward_reads_it():
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(2, 3, 6, 6)
    rnet = capture(model, x)
    group = next(g for g in rnet.channel_groups() for m in g.members if (m.node, m.dim) == ("block.conv", 0))
    with pytest.raises(PruningError, match=r"block.pool \(_ChannelMean\) depends on a size"):
        apply_plan(model, rnet, {group: [0, 3, 5, 6]}, inputs=((x,), {}))


def test_a_width_read_by_a_reshape_of_the_modules_own_forward_is_rewritten():
    torch.manual_seed(0)
    model = _Net(_OwnReshape).eval()
    x = torch.randn(2, 3, 6, 6)
    rnet = capture(model, x)
    group = next(g for g in rnet.channel_groups() for m in g.members if (m.node, m.dim) == ("block.conv", 0))
    plan = {group: [0, 3, 5, 6]}
    pruned = apply_plan(model, rnet, plan, inputs=((x,), {}))
    assert pruned.block.width == 4 and model.block.width == 8
    with torch.no_grad():
        _assert_close(pruned(torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(2))),
                      rnet.mask_channels(plan)(torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(2))))
