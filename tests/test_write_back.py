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


# ---------------------------------------------------------------- Hugging Face models inside the user's own module
class _CausalWrapper(nn.Module):
    """A user's module holding a Hugging Face causal LM (``self.model = AutoModelForCausalLM...``) and scaling its
    logits."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.model = lm
        self.temperature = 2.0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, use_cache=False).logits / self.temperature


class _Classifier(nn.Module):
    """A classifier head around a Hugging Face encoder backbone, reading its first token."""

    def __init__(self, backbone: nn.Module, classes: int = 3):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])


def _reloaded(model: nn.Module, tmp_path) -> nn.Module:
    model.save_pretrained(tmp_path)
    return type(model).from_pretrained(tmp_path, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_a_wrapped_causal_lm_is_refitted_and_reloads_from_pretrained_with_the_pruned_outputs(family, tmp_path):
    from graph.config_plan import config_expressible_plan

    wrapper = _CausalWrapper(hf_models.FAMILIES[family]("eager")).eval()
    ids, _ = hf_models.token_inputs(2, 8, padded=False)
    rnet = capture(wrapper, ids)
    plan = config_expressible_plan(wrapper, rnet, plan_by_ratio(rnet, 0.5))
    assert not plan.excluded and not plan.trimmed and len(plan) == 2 * LAYERS
    pruned = apply_plan(wrapper, rnet, plan, inputs=((ids,), {}))
    kv_heads = 2 if family in ("qwen2", "qwen3") else HEADS
    config = pruned.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (
        HEADS // 2, kv_heads // 2, INTERMEDIATE // 2)
    assert wrapper.model.config.intermediate_size == INTERMEDIATE
    loaded = _reloaded(pruned.model, tmp_path)
    other, _ = hf_models.token_inputs(3, 11, padded=False, seed=5)
    with torch.no_grad():
        expected = rnet.mask_channels(plan)(other)
        _assert_close(pruned(other), expected)
        _assert_close(loaded(other, use_cache=False).logits / 2.0, expected)


def test_a_classifier_head_around_a_bert_backbone_keeps_the_mlp_and_leaves_out_heads_no_config_holds(tmp_path):
    from graph.config_plan import config_expressible_plan

    torch.manual_seed(0)
    model = _Classifier(hf_models.bert("eager")).eval()
    ids, mask = hf_models.token_inputs(2, 8, padded=True)
    rnet = capture(model, ids, mask)
    requested = plan_by_ratio(rnet, 0.5)
    plan = config_expressible_plan(model, rnet, requested)
    heads = {g for g in requested if g.size == HEADS}
    # The unused pooler's output width is the hidden size in the config: no field holds it alone either.
    pooler = {g for g in requested if any((m.node, m.dim) == ("backbone.pooler.dense", 0) for m in g.members)}
    assert len(heads) == LAYERS and len(pooler) == 1 and set(plan.excluded) == heads | pooler
    assert set(plan) == set(requested) - heads - pooler
    assert all("BertConfig cannot hold" in reason for reason in plan.excluded.values())
    pruned = apply_plan(model, rnet, plan, inputs=((ids, mask), {}))
    assert pruned.backbone.config.intermediate_size == INTERMEDIATE // 2
    loaded = _reloaded(pruned.backbone, tmp_path)
    other, other_mask = hf_models.token_inputs(3, 10, padded=True, seed=6)
    with torch.no_grad():
        expected = rnet.mask_channels(plan)(other, other_mask)
        _assert_close(pruned(other, other_mask), expected)
        _assert_close(pruned.head(loaded(other, attention_mask=other_mask).last_hidden_state[:, 0]), expected)


def test_a_config_held_outside_any_hugging_face_model_is_refused_and_left_out_of_the_config_plan():
    import copy

    from graph.config_plan import config_expressible_plan

    wrapper = _CausalWrapper(hf_models.llama("eager")).eval()
    wrapper.config = copy.deepcopy(wrapper.model.config)  # a second config no PreTrainedModel owns
    ids, _ = hf_models.token_inputs(2, 8, padded=False)
    rnet = capture(wrapper, ids)
    requested = plan_by_ratio(rnet, 0.5)
    with pytest.raises(PruningError, match="the model .*_CausalWrapper.* holds a LlamaConfig that apply_plan cannot "
                                           "refit"):
        apply_plan(wrapper, rnet, requested, inputs=((ids,), {}))
    plan = config_expressible_plan(wrapper, rnet, requested)
    assert not plan and set(plan.excluded) == set(requested)
    assert all("cannot refit" in reason for reason in plan.excluded.values())


def test_value_only_head_dim_groups_of_a_single_kv_head_are_left_out_and_the_rest_reloads(tmp_path):
    import transformers

    from graph.config_plan import config_expressible_plan

    config = transformers.LlamaConfig(vocab_size=hf_models.VOCAB, hidden_size=hf_models.HIDDEN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=1,
                                      intermediate_size=INTERMEDIATE, max_position_embeddings=128,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    wrapper = _CausalWrapper(transformers.LlamaForCausalLM(config).eval()).eval()
    ids, _ = hf_models.token_inputs(2, 8, padded=False)
    rnet = capture(wrapper, ids)
    requested = plan_by_ratio(rnet, 0.5)
    plan = config_expressible_plan(wrapper, rnet, requested)
    # Hand-derived: the channels of the one value head, each used by every query head, with no k/q rows.
    value_only = {g for g in requested if any(m.node.endswith("v_proj") and m.dim == 0 for m in g.members)
                  and not any(m.node.endswith(("k_proj", "q_proj")) for m in g.members)}
    assert len(value_only) == LAYERS and all(g.size == HEAD_DIM for g in value_only)
    assert set(plan.excluded) == value_only and set(plan) == set(requested) - value_only
    pruned = apply_plan(wrapper, rnet, plan, inputs=((ids,), {}))
    assert (pruned.model.config.intermediate_size, pruned.model.config.num_key_value_heads) == (INTERMEDIATE // 2, 1)
    loaded = _reloaded(pruned.model, tmp_path)
    with torch.no_grad():
        _assert_close(loaded(ids, use_cache=False).logits / 2.0, rnet.mask_channels(plan)(ids))


def _falcon() -> nn.Module:
    import transformers

    config = transformers.FalconConfig(vocab_size=hf_models.VOCAB, hidden_size=hf_models.HIDDEN,
                                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, multi_query=False,
                                       new_decoder_architecture=False, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.FalconForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["gpt2", "falcon"])
def test_heads_whose_size_derives_from_the_hidden_size_are_left_out_even_with_qkv_rows_interleaved(family, tmp_path):
    from graph.config_plan import config_expressible_plan

    wrapper = _CausalWrapper(_falcon() if family == "falcon" else hf_models.gpt2("eager")).eval()
    ids, _ = hf_models.token_inputs(2, 8, padded=False)
    rnet = capture(wrapper, ids)
    requested = plan_by_ratio(rnet, 0.5)
    heads = {g for g in requested if g.size == HEADS}
    mlp = set(requested) - heads
    if family == "falcon":  # fused rows interleave per head: q, k, v of head 0, then of head 1 ...
        rows = next(m for g in heads for m in g.members if m.node.endswith("query_key_value.weight"))
        assert rows.positions[0].tolist() == list(range(3 * HEAD_DIM))
    plan = config_expressible_plan(wrapper, rnet, requested)
    # Falcon's MLP width is 4 x hidden size, which no field holds alone; GPT-2's is n_inner.
    left_out = heads | (mlp if family == "falcon" else set())
    assert len(heads) == LAYERS and set(plan.excluded) == left_out and set(plan) == set(requested) - left_out
    assert all(type(wrapper.model.config).__name__ in reason for reason in plan.excluded.values())
    pruned = apply_plan(wrapper, rnet, plan, inputs=((ids,), {}))
    loaded = _reloaded(pruned.model, tmp_path)
    assert loaded.config.num_attention_heads == HEADS
    with torch.no_grad():
        _assert_close(loaded(ids, use_cache=False).logits / 2.0, rnet.mask_channels(plan)(ids))


def test_layers_pruned_unevenly_are_trimmed_to_one_count_the_config_holds():
    from graph.config_plan import config_expressible_plan

    wrapper = _CausalWrapper(hf_models.llama("eager")).eval()
    ids, _ = hf_models.token_inputs(2, 8, padded=False)
    rnet = capture(wrapper, ids)
    mlp = [g for g in rnet.channel_groups() if g.size == INTERMEDIATE]
    plan = config_expressible_plan(wrapper, rnet, {mlp[0]: [5, 9, 1, 7], mlp[1]: [3, 2]})
    assert plan == {mlp[0]: [5, 9], mlp[1]: [3, 2]} and plan.trimmed == {mlp[0]: 4} and not plan.excluded
    pruned = apply_plan(wrapper, rnet, plan, inputs=((ids,), {}))
    assert pruned.model.config.intermediate_size == INTERMEDIATE - 2


def test_per_layer_list_fields_are_fitted_entry_by_entry(tmp_path):
    import transformers

    from graph.config_plan import config_expressible_plan

    config = transformers.Gemma3nTextConfig(
        vocab_size=hf_models.VOCAB, vocab_size_per_layer_input=hf_models.VOCAB, hidden_size=hf_models.HIDDEN,
        hidden_size_per_layer_input=8, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
        head_dim=HEAD_DIM, intermediate_size=[INTERMEDIATE, 96], laurel_rank=8, altup_num_inputs=2,
        num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0],
        layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    torch.manual_seed(0)
    wrapper = _CausalWrapper(transformers.Gemma3nForCausalLM(config).eval()).eval()
    ids, _ = hf_models.token_inputs(2, 8, padded=False)
    rnet = capture(wrapper, ids)
    requested = plan_by_ratio(rnet, 0.5)
    plan = config_expressible_plan(wrapper, rnet, requested)
    mlp = {g for g in plan if any(m.node.endswith("down_proj") and m.dim == 1 for m in g.members)}
    assert sorted(g.size for g in mlp) == [96, INTERMEDIATE] and not plan.trimmed
    # AltUp's prediction inputs and LAuReL's rank have no config field in the fitted set: left out, with the reason.
    assert plan.excluded and all("no field of the Gemma3nTextConfig holds" in r for r in plan.excluded.values())
    pruned = apply_plan(wrapper, rnet, plan, inputs=((ids,), {}))
    assert list(pruned.model.config.intermediate_size) == [INTERMEDIATE // 2, 48]
    assert list(wrapper.model.config.intermediate_size) == [INTERMEDIATE, 96]
    loaded = _reloaded(pruned.model, tmp_path)
    with torch.no_grad():
        _assert_close(loaded(ids, use_cache=False).logits / 2.0, rnet.mask_channels(plan)(ids))


def test_swin_v2_relative_coords_table_joins_no_channel_group_and_its_channel_groups_prune_exactly():
    torch.manual_seed(0)
    model = torchvision.models.swin_v2_t(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    rnet = capture(model, x)
    tables = [g for g in rnet.channel_groups() if any(m.node.endswith("relative_coords_table") for m in g.members)]
    coordinates = [g for g in tables for m in g.members if m.node.endswith("relative_coords_table") and m.dim == 3]
    assert len(coordinates) == 12 and all(not g.prunable and "holds no channels" in g.reason for g in coordinates)
    assert not any(g.prunable for g in tables)
    plan = {g: drop for g, drop in plan_by_ratio(rnet, 0.5).items() if g.exact}
    assert not set(plan) & set(tables) and len(plan) > 20
    other = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _assert_close(rnet.prune_channels(plan)(other), rnet.mask_channels(plan)(other))
    mlp = {g: drop for g, drop in plan.items() if any(m.node.endswith("mlp.0") for m in g.members)}
    pruned = apply_plan(model, rnet, mlp, inputs=((x,), {}))
    table = model.features[1][0].attn.relative_coords_table
    assert pruned.features[1][0].attn.relative_coords_table.shape == table.shape
    with torch.no_grad():
        _assert_close(pruned(other), rnet.mask_channels(mlp)(other))


def test_per_stage_widths_of_a_wrapped_convnext_are_fitted_into_its_hidden_sizes(tmp_path):
    import transformers

    from graph.config_plan import config_expressible_plan

    config = transformers.ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=5)
    torch.manual_seed(0)
    convnext = transformers.ConvNextForImageClassification(config).eval()

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = convnext

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.net(pixel_values).logits

    wrapper = Wrapper().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    rnet = capture(wrapper, x)
    requested = plan_by_ratio(rnet, 0.5)
    # Per stage: its residual width (hidden_sizes[i]) and its MLP (4 x hidden_sizes[i]), neither expressible alone.
    assert sorted(g.size for g in requested) == [16, 32, 48, 64, 64, 128, 192, 256]
    plan = config_expressible_plan(wrapper, rnet, requested, inputs=((x,), {}))
    assert plan == requested and not plan.excluded
    pruned = apply_plan(wrapper, rnet, plan, inputs=((x,), {}))
    assert list(pruned.net.config.hidden_sizes) == [8, 16, 24, 32] and list(config.hidden_sizes) == [16, 32, 48, 64]
    pruned.net.save_pretrained(tmp_path)
    loaded = type(convnext).from_pretrained(tmp_path).eval()
    other = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _assert_close(loaded(other).logits, rnet.prune_channels(plan)(other))


def test_config_expressible_plan_refuses_a_group_of_another_network():
    from graph.config_plan import config_expressible_plan

    model = hf_models.llama("eager")
    ids, _ = hf_models.token_inputs(2, 8, padded=False)
    rnet, other = capture(model, ids, use_cache=False), capture(hf_models.llama("eager"), ids, use_cache=False)
    foreign = next(g for g in other.channel_groups() if g.prunable)
    with pytest.raises(PruningError, match="is not a channel group of this network"):
        config_expressible_plan(model, rnet, {foreign: [0]})
