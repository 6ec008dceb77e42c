"""Structured pruning of Hugging Face transformers (tiny configs of ``hf_models``) in eager and sdpa attention.

Expected groups are derived by hand from the config: per layer one whole-head group (with grouped-query attention, a
key/value head together with the query heads sharing it) and one MLP group. Pruning is checked against masking done
independently on the original transformers model: zeroing the output projection's input columns of the removed
heads or intermediate channels.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from graph import capture  # noqa: E402
from graph.capture import iter_tensors  # noqa: E402
from hf_models import (CAUSAL_FAMILIES, FAMILIES, HEADS, HIDDEN, INTERMEDIATE, LAYERS, image_inputs,  # noqa: E402
                       token_inputs)

ATTENTIONS = ("eager", "sdpa")
KV_HEADS = {"qwen2": 2, "qwen3": 2}
HEAD_DIM = HIDDEN // HEADS

# Per family: (attention output projection, MLP output projection) as (node name pattern, tensor, input dim), and how
# to read the tensor off the original model.
PROJECTIONS = {
    "gpt2": (("transformer.h.{i}.attn.c_proj.weight", "value", 0),
             ("transformer.h.{i}.mlp.c_proj.weight", "value", 0)),
    "bert": (("encoder.layer.{i}.attention.output.dense", "weight", 1), ("encoder.layer.{i}.output.dense", "weight", 1)),
    "llama": (("model.layers.{i}.self_attn.o_proj", "weight", 1), ("model.layers.{i}.mlp.down_proj", "weight", 1)),
    "qwen2": (("model.layers.{i}.self_attn.o_proj", "weight", 1), ("model.layers.{i}.mlp.down_proj", "weight", 1)),
    "qwen3": (("model.layers.{i}.self_attn.o_proj", "weight", 1), ("model.layers.{i}.mlp.down_proj", "weight", 1)),
    "vit": (("vit.layers.{i}.attention.o_proj", "weight", 1), ("vit.layers.{i}.mlp.fc2", "weight", 1)),
}
FAMILY_NAMES = tuple(PROJECTIONS)


def _inputs(family: str) -> tuple[tuple, dict]:
    if family == "vit":
        return (image_inputs(2),), {}
    ids, mask = token_inputs(2, 12, padded=True)
    return (ids,), {"attention_mask": mask, **({"use_cache": False} if family in CAUSAL_FAMILIES else {})}


def _output(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _model_tensor(model, name: str, tensor: str) -> torch.Tensor:
    owner = model
    for part in name.split(".") + ([] if tensor == "value" else [tensor]):
        owner = getattr(owner, part)
    return owner


def _group_of(rnet, node: str, tensor: str, dim: int):
    matches = [(g, m) for g in rnet.channel_groups() for m in g.members
               if (m.node, m.tensor, m.dim) == (node, tensor, dim)]
    assert len(matches) == 1, f"{node}.{tensor}[{dim}] is in {len(matches)} groups"
    return matches[0]


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILY_NAMES for a in ATTENTIONS],
                ids=[f"{f}-{a}" for f in FAMILY_NAMES for a in ATTENTIONS])
def case(request):
    family, attention = request.param
    model = FAMILIES[family](attention)
    args, kwargs = _inputs(family)
    return family, model, capture(model, *args, **kwargs), args, kwargs


def test_groups_per_layer_are_whole_heads_and_mlp_channels_as_derived_from_the_config(case):
    family, _, rnet, _, _ = case
    kv_heads = KV_HEADS.get(family, HEADS)
    per_kv = HEADS // kv_heads
    (attn, attn_tensor, attn_dim), (mlp, mlp_tensor, mlp_dim) = PROJECTIONS[family]
    found = set()
    for layer in range(LAYERS):
        heads, member = _group_of(rnet, attn.format(i=layer), attn_tensor, attn_dim)
        assert (heads.size, heads.prunable, heads.exact) == (kv_heads, True, True)
        columns = sorted(member.positions.tolist())
        width = HEAD_DIM * per_kv
        assert columns == [list(range(k * width, (k + 1) * width)) for k in range(kv_heads)]
        mlp_group, member = _group_of(rnet, mlp.format(i=layer), mlp_tensor, mlp_dim)
        assert (mlp_group.size, mlp_group.prunable, mlp_group.exact) == (INTERMEDIATE, True, True)
        assert member.positions.shape == (INTERMEDIATE, 1)
        found |= {heads.id, mlp_group.id}
    assert len(found) == 2 * LAYERS
    others = [g for g in rnet.channel_groups() if g.prunable and not g.explicit_only and g.id not in found]
    # Only ViT's residual width (patch projection, class token, every LayerNorm) is left, inexact through its norms.
    assert [(g.size, g.exact) for g in others] == ([(HIDDEN, False)] if family == "vit" else [])


def _plan_and_mask(case, drop_heads: list[int], drop_mlp: list[int]):
    """A plan removing group channels ``drop_heads`` / ``drop_mlp`` in every layer, and the original model masked
    independently by zeroing those channels' output-projection columns."""
    family, model, rnet, _, _ = case
    masked = FAMILIES[family](model.config._attn_implementation)
    plan = {}
    with torch.no_grad():
        for layer in range(LAYERS):
            for (node, tensor, dim), drop in zip(PROJECTIONS[family], (drop_heads, drop_mlp)):
                group, member = _group_of(rnet, node.format(i=layer), tensor, dim)
                plan[group] = drop
                columns = torch.as_tensor(member.positions[drop].ravel())
                _model_tensor(masked, node.format(i=layer), tensor).index_fill_(dim, columns, 0)
    return plan, masked.eval()


def test_pruning_heads_and_mlp_channels_equals_masking_their_output_columns(case):
    family, model, rnet, args, kwargs = case
    plan, masked = _plan_and_mask(case, [1], [0, 5, 77])
    with torch.no_grad():
        pruned_out, masked_out = _output(rnet.prune_channels(plan)(*args, **kwargs)), _output(masked(*args, **kwargs))
        original = _output(model(*args, **kwargs))
        soft_out = _output(rnet.mask_channels(plan)(*args, **kwargs))
    scale = masked_out.abs().max()
    assert ((pruned_out - masked_out).abs().max() / scale).item() <= 1e-5
    assert ((soft_out - masked_out).abs().max() / scale).item() <= 1e-5
    assert ((masked_out - original).abs().max() / scale).item() > 1e-4


def test_pruned_network_runs_forward_and_backward_with_the_original_output_shape(case):
    family, model, rnet, args, kwargs = case
    plan, _ = _plan_and_mask(case, [0], list(range(0, INTERMEDIATE, 2)))
    pruned = rnet.prune_channels(plan).train()
    out = _output(pruned(*args, **kwargs))
    with torch.no_grad():
        assert out.shape == _output(model(*args, **kwargs)).shape
    sum(t.square().mean() for _, t in iter_tensors(pruned(*args, **kwargs)) if t.is_floating_point()).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in pruned.parameters() if p.requires_grad)
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in pruned.parameters())
    kv_heads = KV_HEADS.get(family, HEADS)
    per_layer_mlp = INTERMEDIATE // 2 * (HIDDEN * (3 if family in ("llama", "qwen2", "qwen3") else 2) + (
        0 if family in ("llama", "qwen2", "qwen3") else 1))
    assert removed >= LAYERS * per_layer_mlp


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_gqa_pruning_removes_a_kv_head_with_its_query_heads_keeping_the_ratio_integral(attention):
    model = FAMILIES["qwen2"](attention)
    args, kwargs = _inputs("qwen2")
    rnet = capture(model, *args, **kwargs)
    group, _ = _group_of(rnet, "model.layers.0.self_attn.o_proj", "weight", 1)
    pruned = rnet.prune_channels({group: [0]})
    attention_of = pruned.module_of(pruned.node("model.layers.0.self_attn.q_proj"))
    q_rows = attention_of.weight.shape[0]
    k_rows = pruned.module_of(pruned.node("model.layers.0.self_attn.k_proj")).weight.shape[0]
    v_rows = pruned.module_of(pruned.node("model.layers.0.self_attn.v_proj")).weight.shape[0]
    assert (k_rows // HEAD_DIM, v_rows // HEAD_DIM) == (KV_HEADS["qwen2"] - 1, KV_HEADS["qwen2"] - 1)
    assert q_rows // HEAD_DIM == HEADS // KV_HEADS["qwen2"] * (KV_HEADS["qwen2"] - 1)
    assert (q_rows // HEAD_DIM) % (k_rows // HEAD_DIM) == 0
    with torch.no_grad():
        assert pruned(*args, **kwargs).logits.shape == model(*args, **kwargs).logits.shape


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_residual_hidden_size_is_a_group_pruned_only_when_named(family):
    from graph.pruning import plan_by_ratio

    model = FAMILIES[family]("eager")
    args, kwargs = _inputs(family)
    rnet = capture(model, *args, **kwargs)
    embedding = "transformer.wte" if family == "gpt2" else "model.embed_tokens"
    hidden, _ = _group_of(rnet, embedding, "weight", 1)
    assert (hidden.size, hidden.prunable, hidden.explicit_only) == (HIDDEN, True, True)
    assert "residual" in hidden.reason
    assert hidden not in plan_by_ratio(rnet, 0.5)
    pruned = rnet.prune_channels({hidden: list(range(0, HIDDEN, 4))})
    with torch.no_grad():
        out = pruned(*args, **kwargs).logits
    assert out.shape == model(*args, **kwargs).logits.shape and torch.isfinite(out).all()
    assert pruned.module_of(pruned.node(embedding)).weight.shape[1] == HIDDEN - HIDDEN // 4


# Per family, the config fields a 50% plan of every default group sets, derived by hand from the config: GPT-2 and
# BERT derive their head size from the hidden size, so no config holds their pruned heads (left out); ViT's residual
# width is its hidden_size (head_dim pinned, so the heads keep their size).
CONFIG_AFTER_HALF = {
    "gpt2": {"n_inner": INTERMEDIATE // 2, "n_head": HEADS},
    "bert": {"intermediate_size": INTERMEDIATE // 2, "num_attention_heads": HEADS},
    "llama": {"intermediate_size": INTERMEDIATE // 2, "num_attention_heads": HEADS // 2, "num_key_value_heads": 2},
    "qwen2": {"intermediate_size": INTERMEDIATE // 2, "num_attention_heads": HEADS // 2, "num_key_value_heads": 1},
    "qwen3": {"intermediate_size": INTERMEDIATE // 2, "num_attention_heads": HEADS // 2, "num_key_value_heads": 1},
    "vit": {"intermediate_size": INTERMEDIATE // 2, "num_attention_heads": HEADS // 2, "hidden_size": HIDDEN // 2},
}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_config_expressible_plan_keeps_what_each_family_config_holds_and_the_copy_reloads(family, tmp_path):
    from graph.config_plan import config_expressible_plan
    from graph.pruning import plan_by_ratio
    from graph.write_back import apply_plan

    model = FAMILIES[family]("eager")
    args, kwargs = _inputs(family)
    rnet = capture(model, *args, **kwargs)
    requested = plan_by_ratio(rnet, 0.5)
    plan = config_expressible_plan(model, rnet, requested, inputs=(args, kwargs))
    heads = {g for g in requested if g.size == KV_HEADS.get(family, HEADS)}
    left_out = heads if family in ("gpt2", "bert") else set()
    assert len(heads) == LAYERS and set(plan.excluded) == left_out and set(plan) == set(requested) - left_out
    assert all(f"{type(model.config).__name__} cannot hold" in reason for reason in plan.excluded.values())
    pruned = apply_plan(model, rnet, plan, inputs=(args, kwargs))
    assert {field: getattr(pruned.config, field) for field in CONFIG_AFTER_HALF[family]} == CONFIG_AFTER_HALF[family]
    pruned.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = _output(rnet.prune_channels(plan)(*args, **kwargs))
        assert ((_output(loaded(*args, **kwargs)) - expected).abs().max() / expected.abs().max()).item() <= 1e-5
