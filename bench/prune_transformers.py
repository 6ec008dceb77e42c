"""Benchmark structured pruning of Hugging Face transformers: ours against Torch-Pruning 1.6, side by side.

Every family (GPT-2, BERT, Llama, Qwen2 with grouped-query attention, Qwen3 with per-head q/k RMSNorm, ViT, and
Mistral, Phi-3 with fused qkv / gate-up projections, Gemma) is built from its config class with random weights at a
small but not trivial size (hidden 256, 4 layers, 8 heads, 4 key/value heads where grouped, intermediate 688,
vocabulary 1000; nothing is downloaded), in eval mode, once with ``attn_implementation="eager"`` and once with
``"sdpa"``. Each side of each model runs in a fresh subprocess with a timeout:

* ours: ``graph.capture(model, input_ids, attention_mask=mask, use_cache=False)`` at batch 2 x 16 tokens (left
  padded; 2 images of 64 x 64 for ViT); replay at batch 3 with 7 and 33 tokens against the original model; the
  channel groups (``rnet.channel_groups()``) sorted into whole-head groups (members spanning several positions per
  channel), MLP groups (the config's intermediate size), the residual hidden group and the rest; 50% of every head
  group and every MLP group removed by ``plan_by_ratio(rnet, 0.5, "l2")`` (local L2 ranking, the same count in every
  layer); the pruned network against ``mask_channels`` of the same plan; params and MACs (``rnet.flops()``);
  ``graph.write_back.apply_plan`` (which verifies the copy against the pruned network), ``save_pretrained`` /
  ``from_pretrained`` of the copy, and for causal LMs ``generate(max_new_tokens=8, do_sample=False)`` against greedy
  argmax decoding of the pruned network without a cache. Where the config derives the head size from the hidden size
  (GPT-2, BERT) it cannot hold pruned heads: the write-back is then done again with ``fit_config=False`` (the
  modules' size attributes are rewritten, the config is kept) and the copy is reloaded with ``torch.save`` /
  ``torch.load`` instead;
* peer: Torch-Pruning's LLM recipe (``examples/LLMs/prune_llm.py``): ``MetaPruner`` with
  ``GroupMagnitudeImportance(p=2, group_reduction="mean")`` (1.6's name
  for the recipe's ``GroupNormImportance``), ``global_pruning=False``, ``pruning_ratio=0.5``,
  ``num_heads`` (query projections: ``num_attention_heads``; key and value projections: ``num_key_value_heads``;
  fused qkv: ``num_attention_heads``), ``prune_num_heads=True``, ``prune_head_dims=False``,
  ``head_pruning_ratio=0.5``, ``out_channel_groups`` 2 for fused gate-up projections, ``round_to=4``, ignoring the
  output layers (``lm_head``, classifier, pooler) and the embeddings, then ``step()`` and the recipe's rewrite of the
  attention modules' and config's size attributes (by module names ending in ``self_attn`` and ``mlp``, as written);
  the recipe finds attention by the name ``self_attn``: here its projections are found by attribute names in every
  family (``q_proj``/``query``/``qkv_proj``/``c_attn``) so that GPT-2, BERT and ViT get head counts too. The
  constructor is first tried as written; when tracing the model's default forward fails (transformers 5 returns a
  ``DynamicCache`` that Torch-Pruning cannot flatten) that failure is listed and the causal LMs are traced with
  ``use_cache=False`` (``forward_fn``) for the rest. Then the pruned model's forward, ``save_pretrained`` /
  ``from_pretrained`` and ``generate``. The peer passes when every stage after the workaround passes and something
  was pruned.

With ``--wrapped`` a third row set puts each model inside the user's own module (``UserModule``: ``self.model =
...``, forward passed through), captures the wrapper, keeps ``plan_by_ratio(rnet, 0.5)`` of every default group
(heads, MLP and whatever else the analysis finds) to what the config can hold
(``graph.config_plan.config_expressible_plan``; what it leaves out is listed with the reason), writes it back with
``apply_plan``, reloads the inner model with ``save_pretrained`` / ``from_pretrained`` and, for causal LMs, compares
its greedy ``generate`` with the pruned network's argmax decoding.

Ours passes ("yes") when every check holds with heads and MLP written back and the config refitted; "yes (config
kept)" when every check holds but the config cannot hold the pruned heads, so they were written back with
``fit_config=False``.

Times are process CPU times with ``torch.set_num_threads(1)``.

Run ``python bench/prune_transformers.py`` (``--help`` for subsets and settings); the table is printed and written to
``bench/results/prune_transformers.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import transformers  # noqa: E402

from bench.zoo import (add_side_arguments, failure, failure_section, relative_error, run_json_child,  # noqa: E402
                       timed, write_atomically)
from graph import capture  # noqa: E402
from graph.capture import iter_tensors  # noqa: E402
from graph.pruning import plan_by_ratio  # noqa: E402
from graph.errors import PruningError  # noqa: E402
from graph.config_plan import config_expressible_plan  # noqa: E402
from graph.write_back import apply_plan  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 256, 4, 8, 4, 688, 1000
BATCH, LENGTH, REPLAY_BATCH, REPLAY_LENGTHS, NEW_TOKENS = 2, 16, 3, (7, 33), 8
IMAGE_SIZE, PATCH_SIZE = 64, 8
RATIO = 0.5
EXACT_TOLERANCE = 1e-5
ATTENTIONS = ("eager", "sdpa")
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "prune_transformers.md")

_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=INTERMEDIATE, max_position_embeddings=128)
# family: (model class, config class, config fields, causal LM)
FAMILIES: dict[str, tuple[type, type, dict, bool]] = {
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config,
             dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE,
                  n_positions=128, bos_token_id=0, eos_token_id=0), True),
    "bert": (transformers.BertModel, transformers.BertConfig,
             dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=INTERMEDIATE, max_position_embeddings=128), False),
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, dict(_DECODER, num_key_value_heads=HEADS), True),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, dict(_DECODER, num_key_value_heads=KV_HEADS),
              True),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config,
              dict(_DECODER, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS), True),
    "vit": (transformers.ViTForImageClassification, transformers.ViTConfig,
            dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 intermediate_size=INTERMEDIATE, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_labels=10), False),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig,
                dict(_DECODER, num_key_value_heads=KV_HEADS), True),
    "phi3": (transformers.Phi3ForCausalLM, transformers.Phi3Config,
             dict(_DECODER, num_key_value_heads=KV_HEADS, pad_token_id=0, bos_token_id=0, eos_token_id=0), True),
    "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig,
              dict(_DECODER, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS), True),
}


FITTED, CONFIG_KEPT = "heads+mlp", "heads+mlp, config kept"  # how apply_plan wrote the plan back


def build(family: str, attention: str) -> nn.Module:
    """The seeded eval-mode model of ``family`` with ``attention`` (``eager`` or ``sdpa``)."""
    model_class, config_class, fields, _ = FAMILIES[family]
    torch.manual_seed(0)
    return model_class(config_class(**fields, attn_implementation=attention)).eval()


def causal(family: str) -> bool:
    """True for the causal language models (those that ``generate``)."""
    return FAMILIES[family][3]


def inputs(family: str, batch: int, length: int, seed: int = 1) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for the model's forward: token ids with a left-padded mask (every other row padded by
    1, 3, ... tokens), ``use_cache=False`` for causal LMs; ``pixel_values`` for ViT."""
    generator = torch.Generator().manual_seed(seed)
    if family == "vit":
        return (torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),), {}
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(0, batch, 2):
        mask[row, :min(length - 1, 1 + row)] = 0
    return (ids,), {"attention_mask": mask, **({"use_cache": False} if causal(family) else {})}


def _main_output(output: Any) -> torch.Tensor:
    """The logits (or last hidden state) of a model output."""
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _max_abs_diff(reference: Any, other: Any) -> float:
    """max |other - reference| over all output tensors; inf when structure or shapes differ."""
    pairs = list(zip(iter_tensors(reference), iter_tensors(other)))
    if len(pairs) != len(list(iter_tensors(reference))) or any(
            pa != pb or a.shape != b.shape for (pa, a), (pb, b) in pairs):
        return float("inf")
    return max(float((a.float() - b.float()).abs().max()) for (_, a), (_, b) in pairs)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _kind(group, config) -> str:
    """``heads``, ``mlp``, ``hidden`` or ``other`` for a channel group: MLP groups have the config's intermediate size,
    whole heads span several positions per channel (a fused gate-up channel spans two), the residual stream has the
    hidden size."""
    if not group.prunable:
        return "other"
    if group.size == (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)):
        return "mlp"
    if any(m.positions.ndim == 2 and m.positions.shape[1] > 1 for m in group.members):
        return "heads"
    return "hidden" if group.explicit_only or group.size == config.hidden_size else "other"


def _greedy(pruned, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with the pruned network, re-running the whole sequence each step (no cache)."""
    for _ in range(steps):
        logits = pruned(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def _round_trip(model: nn.Module, attention: str, sample: tuple[tuple, dict], pretrained: bool) -> float:
    """max |loaded - model| on ``sample`` after ``save_pretrained`` and ``from_pretrained`` to a temporary folder
    (``pretrained``), else after ``torch.save`` and ``torch.load`` of the whole module (a config that cannot hold the
    pruned sizes cannot rebuild it)."""
    with tempfile.TemporaryDirectory() as folder:
        if pretrained:
            model.save_pretrained(folder)
            loaded = type(model).from_pretrained(folder, attn_implementation=attention).eval()
        else:
            torch.save(model, os.path.join(folder, "model.pt"))
            loaded = torch.load(os.path.join(folder, "model.pt"), weights_only=False).eval()
    args, kwargs = sample
    with torch.no_grad():
        return _max_abs_diff(_main_output(model(*args, **kwargs)), _main_output(loaded(*args, **kwargs)))


def _generate(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)


def _write_back_checks(result: dict, family: str, attention: str, written: nn.Module, pruned) -> None:
    """Save/reload and (causal LMs) generate of the written-back copy, into ``result``."""
    result["reload_diff"] = _round_trip(written, attention, inputs(family, REPLAY_BATCH, REPLAY_LENGTHS[1], seed=3),
                                        pretrained=result["write_back"] == FITTED)
    if causal(family):
        ids = inputs(family, BATCH, LENGTH, seed=4)[0][0]
        with torch.no_grad():
            result["generate_equal"] = bool(torch.equal(_generate(written, ids), _greedy(pruned, ids, NEW_TOKENS)))


def measure_ours(key: str) -> dict:
    """Capture, replay, groups, 50% heads + MLP pruning, exactness, MACs, write-back, reload and generate."""
    family, attention = key.split("/")
    model = build(family, attention)
    args, kwargs = inputs(family, BATCH, LENGTH)
    result: dict = {"name": key, "params_before": _params(model)}
    stage = "capture"
    try:
        rnet, result["capture_s"] = timed(lambda: capture(model, *args, **kwargs))
        stage = "replay"
        replay = []
        for length in REPLAY_LENGTHS if family != "vit" else REPLAY_LENGTHS[:1]:
            new_args, new_kwargs = inputs(family, REPLAY_BATCH, length, seed=2)
            with torch.no_grad():
                replay.append(_max_abs_diff(model(*new_args, **new_kwargs), rnet(*new_args, **new_kwargs)))
        result["replay_diff"] = max(replay)
        stage = "channel_groups"
        groups, result["groups_s"] = timed(rnet.channel_groups)
        kinds = [_kind(g, model.config) for g in groups]
        result.update({f"{k}_groups": kinds.count(k) for k in ("heads", "mlp", "hidden", "other")})
        result["groups"], result["prunable"] = len(groups), sum(g.prunable for g in groups)
        stage = "prune"
        wanted = {g for g, k in zip(groups, kinds) if k in ("heads", "mlp")}
        plan, plan_s = timed(lambda: {g: drop for g, drop in plan_by_ratio(rnet, RATIO, "l2").items()
                                       if g in wanted})
        pruned, prune_s = timed(lambda: rnet.prune_channels(plan))
        result["prune_s"] = plan_s + prune_s
        result["pruned_groups"] = len(plan)
        stage = "mask_channels"
        with torch.no_grad():
            result["max_diff"] = relative_error(rnet.mask_channels(plan)(*args, **kwargs), pruned(*args, **kwargs))
        stage = "count MACs"
        result["macs_before"], result["macs_after"] = rnet.flops().total_macs, pruned.flops().total_macs
        result["params_after"] = _params(pruned)
        stage = "apply_plan"
        try:
            written = apply_plan(model, rnet, plan, inputs=(args, kwargs))
            result["write_back"] = FITTED
        except PruningError as error:  # a config that cannot hold pruned heads is a benchmark result
            result["write_back_error"] = failure(stage, error)["error"]
            stage = "apply_plan (fit_config=False)"
            written = apply_plan(model, rnet, plan, inputs=(args, kwargs), fit_config=False)
            result["write_back"] = CONFIG_KEPT
        stage = "save / reload"
        _write_back_checks(result, family, attention, written, pruned)
    except Exception as error:  # noqa: BLE001 - every failure is a benchmark result
        result.update(failure(stage, error))
    return result


class UserModule(nn.Module):
    """A user's own module holding the Hugging Face model (``self.model = AutoModelForCausalLM...``) and passing its
    inputs through."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def measure_wrapped(key: str) -> dict:
    """The family's model inside a :class:`UserModule`: capture the wrapper, keep the 50% plan of every default group
    to what the config holds (``config_expressible_plan``), write it back, reload the inner model with
    ``from_pretrained`` and (causal LMs) generate."""
    family, attention = key.split("/")
    model = UserModule(build(family, attention)).eval()
    args, kwargs = inputs(family, BATCH, LENGTH)
    result: dict = {"name": key, "params_before": _params(model)}
    stage = "capture"
    try:
        rnet, result["capture_s"] = timed(lambda: capture(model, *args, **kwargs))
        stage = "config_expressible_plan"
        requested = plan_by_ratio(rnet, RATIO, "l2")
        plan, result["plan_s"] = timed(lambda: config_expressible_plan(model, rnet, requested, inputs=(args, kwargs)))
        result.update(requested=len(requested), kept=len(plan), trimmed=len(plan.trimmed),
                      left_out=sorted(f"{len(ids)} x {reason[:160]}" for reason, ids in plan.reasons().items()))
        stage = "apply_plan"
        written, result["write_back_s"] = timed(lambda: apply_plan(model, rnet, plan, inputs=(args, kwargs)))
        result["params_after"] = _params(written)
        result["write_back"] = FITTED
        stage = "save / reload"
        _write_back_checks(result, family, attention, written.model, rnet.prune_channels(plan))
    except Exception as error:  # noqa: BLE001 - every failure is a benchmark result
        result.update(failure(stage, error))
    return result


def wrapped_ok(wrapped: dict | None, family: str) -> bool:
    """Written back into the wrapper with something kept, reloaded with ``from_pretrained`` and (causal LMs)
    generating the pruned network's greedy tokens."""
    return (bool(wrapped) and "error" not in wrapped and wrapped.get("kept", 0) > 0 and _reload_ok(wrapped)
            and (not causal(family) or wrapped.get("generate_equal", False)))


def _wrapped_section(results: list[dict]) -> list[str]:
    """Totals and one row per model for the wrapped row set."""
    rows = [r for r in results if "wrapped" in r]
    if not rows:
        return []
    families = list(dict.fromkeys(r["name"].split("/")[0] for r in rows))
    ok = sum(all(wrapped_ok(r["wrapped"], f) for r in rows if r["name"].startswith(f + "/")) for f in families)
    lines = ["## Inside the user's own module", "",
             f"**Wrapped: {ok}/{len(families)} families** (models: "
             f"{sum(wrapped_ok(r['wrapped'], r['name'].split('/')[0]) for r in rows)}/{len(rows)}). The model sits in "
             "`UserModule` (`self.model = ...`); the wrapper is captured, `plan_by_ratio(rnet, 0.5)` (every default "
             "group) is kept to what the config holds by `config_expressible_plan`, written back with `apply_plan`, "
             "and the inner model is saved with `save_pretrained` and reloaded with `from_pretrained`. OK = kept "
             "groups written back, reload reproduces the copy's logits and greedy `generate` of the copy's inner model "
             "equals the pruned network's argmax decoding.", "",
             "| model | wrapped OK | groups kept / requested (trimmed) | left out | params | reload diff "
             "| generate = greedy | plan s | failure |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w, family = r["wrapped"], r["name"].split("/")[0]
        lines.append(
            f"| {r['name']} | {'yes' if wrapped_ok(w, family) else '**no**'} | "
            f"{w.get('kept', '')} / {w.get('requested', '')} ({w.get('trimmed', '')}) | "
            f"{'; '.join(w.get('left_out', [])).replace('|', '/')} | {_ratio(w, 'params')} | "
            f"{_f(w.get('reload_diff'), '.0e')} | {_yes(w.get('generate_equal')) if causal(family) else 'n/a'} | "
            f"{_f(w.get('plan_s'))} | {w.get('error', '').replace('|', '/')[:300]} |")
    return [*lines, ""]


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """The recipe's ``num_heads``: query projections get ``num_attention_heads``, key/value projections
    ``num_key_value_heads``, fused qkv projections ``num_attention_heads``; found by attribute names."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    found: dict[nn.Module, int] = {}
    for module in model.modules():
        for q, k, v in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value")):
            if all(isinstance(getattr(module, n, None), nn.Module) for n in (q, k, v)):
                found.update({getattr(module, q): heads, getattr(module, k): kv_heads, getattr(module, v): kv_heads})
        for fused in ("qkv_proj", "c_attn"):
            if isinstance(getattr(module, fused, None), nn.Module):
                found[getattr(module, fused)] = heads
    return found


def _ignored(model: nn.Module) -> list[nn.Module]:
    """Output layers (``lm_head``, classifier, pooler) and embeddings (token tables, ViT's patch projection)."""
    names = ("lm_head", "classifier", "pooler.dense", "vit.embeddings.patch_embeddings.projection")
    found = [m for n, m in model.named_modules() if n in names]
    return found + [m for m in model.modules() if isinstance(m, nn.Embedding)]


def _recipe_rewrite(model: nn.Module, gqa: bool) -> None:
    """The recipe's update of module attributes and config fields after ``step()``, as written in prune_llm.py."""
    config = model.config
    if getattr(model, "lm_head", None) is not None:
        config.hidden_size = model.lm_head.in_features
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            fused = hasattr(module, "qkv_proj")
            module.hidden_size = module.qkv_proj.out_features // 3 if fused else module.q_proj.out_features
            module.num_heads = module.hidden_size // module.head_dim
            config.num_attention_heads = module.num_heads
            if not gqa:
                module.num_key_value_heads = module.num_heads
            module.num_key_value_groups = module.num_heads // module.num_key_value_heads
        elif name.endswith("mlp"):
            if hasattr(module, "gate_proj"):
                module.hidden_size = module.gate_proj.in_features
                config.intermediate_size = module.gate_proj.out_features
            elif hasattr(module, "gate_up_proj"):
                module.hidden_size = module.gate_up_proj.in_features
                config.intermediate_size = module.gate_up_proj.out_features // 2
            else:
                raise ValueError("Unknown mlp layer")
    if not gqa:
        config.num_key_value_heads = config.num_attention_heads


def _peer_stage(result: dict, stage: str, fn: Callable[[], Any]) -> Any:
    """Run one peer stage; its failure is recorded under ``failures`` and later stages still run."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - every failure is a benchmark result
        result.setdefault("failures", []).append(failure(stage, error))
        return None


def measure_peer(key: str) -> dict:
    """Torch-Pruning 1.6 with its LLM recipe: prune, rewrite sizes, forward, save/reload, generate."""
    import torch_pruning as tp

    family, attention = key.split("/")
    model = build(family, attention)
    args, kwargs = inputs(family, BATCH, LENGTH)
    with torch.no_grad():
        reference = _main_output(model(*args, **kwargs))
    config = model.config
    gqa = getattr(config, "num_key_value_heads", config.num_attention_heads) != config.num_attention_heads
    result: dict = {"name": key, "params_before": _params(model)}
    example = inputs(family, 1, LENGTH)[0][0]

    def pruner(target: nn.Module, forward_fn: Callable | None):
        importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
        return tp.pruner.MetaPruner(
            target, example_inputs=example, importance=importance,
            global_pruning=False, pruning_ratio=RATIO, ignored_layers=_ignored(target),
            num_heads=_attention_heads(target), prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=RATIO,
            out_channel_groups={m: 2 for n, m in target.named_modules() if n.endswith("gate_up_proj")}, round_to=4,
            forward_fn=forward_fn)

    try:
        pruner(copy.deepcopy(model), None)
    except Exception as error:  # noqa: BLE001 - the recipe as written failing is a benchmark result
        result["as_written_error"] = failure("MetaPruner as written", error)["error"]

    def prune() -> bool:
        no_cache = (lambda target, x: target(x, use_cache=False)) if causal(family) else None
        for group in pruner(model, no_cache).step(interactive=True):
            group.prune()
        return True

    pruned_ok, result["prune_s"] = timed(lambda: _peer_stage(result, "prune (MetaPruner + step)", prune))
    if not pruned_ok:
        return result
    result["params_after"] = _params(model)
    _peer_stage(result, "recipe rewrite of sizes", lambda: _recipe_rewrite(model, gqa))

    def forward() -> None:
        with torch.no_grad():
            out = _main_output(model(*args, **kwargs))
        if out.shape != reference.shape:
            raise ValueError(f"output shape {tuple(out.shape)}, original {tuple(reference.shape)}")
        result["forward_ok"] = True

    _peer_stage(result, "forward", forward)
    sample = inputs(family, REPLAY_BATCH, REPLAY_LENGTHS[1], seed=3)
    result["reload_diff"] = _peer_stage(result, "save_pretrained / from_pretrained",
                                        lambda: _round_trip(model, attention, sample, pretrained=True))
    if causal(family):
        ids = inputs(family, BATCH, LENGTH, seed=4)[0][0]
        result["generate_ok"] = _peer_stage(result, "generate", lambda: _generate(model, ids) is not None)
    return result


SIDES = {"ours": measure_ours, "peer": measure_peer, "wrapped": measure_wrapped}


def run_model(key: str, sides: list[str], threads: int, timeout: float) -> dict:
    """Both sides of one family/attention pair, each in a fresh interpreter."""
    result = {"name": key}
    for side in sides:
        command = [sys.executable, os.path.abspath(__file__), "--child", key, "--side", side,
                   "--threads", str(threads)]
        result[side] = run_json_child(command, key, timeout)
    return result


def _reload_ok(side: dict) -> bool:
    return side.get("reload_diff") is not None and side["reload_diff"] <= EXACT_TOLERANCE


def ours_ok(ours: dict, family: str, write_back: str = FITTED) -> bool:
    """Everything held: exact replay, pruned = masked, written back (``write_back``: how), reloaded, generated."""
    return ("error" not in ours and ours.get("write_back") == write_back and ours["replay_diff"] <= 1e-4
            and ours["max_diff"] <= EXACT_TOLERANCE and _reload_ok(ours)
            and (not causal(family) or ours.get("generate_equal", False)))


def _ours_status(ours: dict, family: str) -> str:
    if ours_ok(ours, family):
        return "yes"
    return "yes (config kept)" if ours_ok(ours, family, CONFIG_KEPT) else "**no**"


def peer_ok(peer: dict | None, family: str) -> bool:
    """Pruned, forward ran, save/reload reproduced the logits and (causal LMs) generate ran, with no failure."""
    return (bool(peer) and "error" not in peer and not peer.get("failures") and peer.get("forward_ok", False)
            and peer.get("params_after", peer["params_before"]) < peer["params_before"]
            and _reload_ok(peer) and (not causal(family) or bool(peer.get("generate_ok"))))


def _f(value: float | None, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def _ratio(side: dict | None, key: str) -> str:
    return f"{side[f'{key}_after'] / side[f'{key}_before']:.2f}" if side and f"{key}_after" in side else ""


def _peer_causes(peer: dict | None) -> list[str]:
    if not peer:
        return []
    if "error" in peer:
        return [f"{peer.get('stage', 'run')}: {peer['error']}"]
    causes = [f"{f['stage']}: {f['error']}" for f in peer.get("failures", [])]
    if "as_written_error" in peer:
        causes.insert(0, f"recipe as written (MetaPruner tracing the default forward): {peer['as_written_error']}")
    if peer.get("params_after") == peer["params_before"]:
        causes.append("pruned nothing")
    if peer.get("reload_diff") is not None and not _reload_ok(peer):
        causes.append(f"reloaded model differs (max diff {peer['reload_diff']:.1e})")
    return causes


def _ours_causes(ours: dict) -> list[str]:
    if "error" in ours:
        return [f"{ours.get('stage', 'run')}: {ours['error']}"]
    causes = [f"config cannot hold the heads, written back with fit_config=False ({ours['write_back_error']})"] \
        if "write_back_error" in ours else []
    if "generate_equal" in ours and not ours["generate_equal"]:
        causes.append("generate differs from greedy")
    return causes


def _yes(flag: bool | None) -> str:
    return "" if flag is None else "yes" if flag else "**no**"


def _row(result: dict) -> str:
    family = result["name"].split("/")[0]
    ours, peer = result["ours"], result.get("peer")
    groups = (f"{ours['heads_groups']} / {ours['mlp_groups']} / {ours['hidden_groups']} / {ours['prunable']}"
              if "groups" in ours else "")
    generate = _yes(ours.get("generate_equal")) if causal(family) else "n/a"
    peer_pruned = bool(peer) and "params_after" in peer
    peer_generate = (_yes(peer.get("generate_ok") or False) if causal(family) else "n/a") if peer_pruned else ""
    notes = "; ".join([f"ours: {c}" for c in _ours_causes(ours)] + [f"peer: {c}" for c in _peer_causes(peer)])
    peer_reload = _yes(_reload_ok(peer)) if peer_pruned else ""
    return (f"| {result['name']} | {_ours_status(ours, family)} | {_f(ours.get('capture_s'))} | "
            f"{_f(ours.get('replay_diff'), '.0e')} | {groups} | {_f(ours.get('max_diff'), '.0e')} | "
            f"{_ratio(ours, 'params')} | {_ratio(ours, 'macs')} | {ours.get('write_back', '')} | "
            f"{_f(ours.get('reload_diff'), '.0e')} | {generate} | "
            f"{_f((ours.get('groups_s') or 0) + ours['prune_s'] if 'prune_s' in ours else None)} | "
            f"{'' if peer is None else 'yes' if peer_ok(peer, family) else '**no**'} | "
            f"{_f(peer and peer.get('prune_s'))} | {_ratio(peer, 'params')} | "
            f"{_yes(peer.get('forward_ok') or False) if peer_pruned else ''} | {peer_reload} | "
            f"{peer_generate} | {notes.replace('|', '/')} |")


def _cause_counts(results: list[dict], side: str) -> list[str]:
    """Failure causes of one side, by exception type and message, with the models they hit."""
    causes: dict[str, list[str]] = {}
    for result in results:
        found = _ours_causes(result[side]) if side == "ours" else _peer_causes(result.get(side))
        for cause in found:
            causes.setdefault(cause, []).append(result["name"])
    return [f"- {side}: {len(names)} x `{cause.replace('`', '')}` ({', '.join(names)})"
            for cause, names in sorted(causes.items(), key=lambda item: -len(item[1]))]


def _totals(results: list[dict], with_peer: bool) -> list[str]:
    families = list(dict.fromkeys(r["name"].split("/")[0] for r in results))

    def families_ok(side: str, ok: Callable[[dict, str], bool]) -> int:
        return sum(all(ok(r[side], f) for r in results if r["name"].startswith(f + "/")) for f in families)

    def config_kept(ours: dict, family: str) -> bool:
        return ours_ok(ours, family, CONFIG_KEPT)

    peer = f"{families_ok('peer', peer_ok)}/{len(families)}" if with_peer else "not run"
    ours_models = sum(ours_ok(r["ours"], r["name"].split("/")[0]) for r in results)
    peer_models = sum(peer_ok(r.get("peer"), r["name"].split("/")[0]) for r in results) if with_peer else 0
    return [f"**Totals: ours {families_ok('ours', ours_ok)}/{len(families)} families, peer {peer}** (a family counts "
            f"when both attention implementations pass every check; models: ours {ours_models}/{len(results)}, peer "
            f"{peer_models if with_peer else 'not run'}/{len(results)}). Ours with every check passed, heads written "
            "back "
            f"with `fit_config=False` (the config cannot hold them; reloaded with torch.load): "
            f"{families_ok('ours', config_kept)}/{len(families)} families.", "", "Failures by cause:", "",
            *_cause_counts(results, "ours"), *(_cause_counts(results, "peer") if with_peer else [])]


def report(results: list[dict], command: str, threads: int, timeout: float, wall_s: float, with_peer: bool) -> str:
    """The markdown report: settings, totals, failures by cause, then one row per model and attention."""
    import importlib.metadata

    peer_version = importlib.metadata.version("torch-pruning") if with_peer else "not run"
    return "\n".join([
        "# Structured pruning of Hugging Face transformers: ours vs Torch-Pruning",
        "",
        f"Reproduce: `{command}` ({wall_s / 60:.1f} min wall, one model at a time).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"torch-pruning {peer_version}; `torch.set_num_threads({threads})`, CPU, float32, eval mode, random weights "
        f"(hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, {KV_HEADS} key/value heads where grouped, intermediate "
        f"{INTERMEDIATE}, vocabulary {VOCAB}; ViT {IMAGE_SIZE}x{IMAGE_SIZE} images, {PATCH_SIZE}x{PATCH_SIZE} "
        f"patches). Each side of each model runs in its own subprocess (timeout {timeout:.0f} s); times are process "
        "CPU times. See the module docstring of `bench/prune_transformers.py` for both sides' exact calls.",
        "",
        *_totals(results, with_peer),
        "",
        f"Columns. Ours: OK = replay exact (<= 1e-4), pruned = masked (<= {EXACT_TOLERANCE:g}), heads and MLP written "
        "back into the model's own class, reload reproduces the logits and greedy `generate` equals the pruned "
        f"network's argmax decoding; capture s (batch {BATCH} x {LENGTH}); replay = max |rnet - model| at batch "
        f"{REPLAY_BATCH} with {' and '.join(map(str, REPLAY_LENGTHS))} tokens (ViT: batch {REPLAY_BATCH}); groups = "
        "head / MLP / hidden / prunable of all; exact = max |pruned - masked| / max(1, max |masked|); params and MACs "
        "after / before (captured forward, `rnet.flops()`); write-back = how `apply_plan` wrote it (\"config kept\": "
        "the "
        "config cannot hold pruned heads, written with `fit_config=False`); reload = max |from_pretrained - copy| "
        f"(config kept: |torch.load - copy|) at batch {REPLAY_BATCH} x "
        f"{REPLAY_LENGTHS[1]}; generate = `generate(max_new_tokens={NEW_TOKENS})` of the copy equals greedy argmax of "
        "the pruned network; groups + prune s. Peer: OK = every stage passed and reload reproduced the logits; "
        "MetaPruner + step s; params after / before; forward runs with the original output shape; reload "
        f"reproduces the logits (<= {EXACT_TOLERANCE:g}); generate runs.",
        "",
        "| model | ours OK | capture s | replay diff | groups h/m/hid/prunable | exact | params | MACs | write-back "
        "| reload diff | generate = greedy | groups+prune s | peer OK | peer prune s | peer params | peer forward "
        "| peer reload | peer generate | failure causes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in results),
        "",
    ])


def _failures(results: list[dict]) -> list[str]:
    """Our failures with stage, exception and last frames."""
    return failure_section("Models we failed on", [(r["name"], f"{r['ours'].get('stage', 'run')}: {r['ours']['error']}",
                                                    r["ours"]) for r in results if "error" in r["ours"]])


def main(argv: list[str] | None = None) -> None:
    """Command line: measure every family (or ``--families``) in both attention implementations and write the
    markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help=f"comma-separated subset of {', '.join(FAMILIES)}")
    parser.add_argument("--attention", default=",".join(ATTENTIONS), help="comma-separated attn implementations")
    parser.add_argument("--wrapped", action="store_true",
                        help="add the row set with each model inside the user's own module (written back, reloaded)")
    add_side_arguments(parser, list(SIDES), timeout=60, out=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        transformers.logging.set_verbosity_error()
        print(json.dumps(SIDES[args.side](args.child)))
        return
    families = args.families.split(",") if args.families else list(FAMILIES)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families: {', '.join(unknown)}")
    sides = (["ours"] if args.skip_peer else ["ours", "peer"]) + (["wrapped"] if args.wrapped else [])
    start = time.perf_counter()
    results = []
    for family in families:
        for attention in args.attention.split(","):
            results.append(run_model(f"{family}/{attention}", sides, args.threads, args.timeout))
            print(_row(results[-1]), flush=True)
    command = "python bench/prune_transformers.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = report(results, command, args.threads, args.timeout, time.perf_counter() - start, not args.skip_peer)
    text += "\n".join(["", *_wrapped_section(results), *_failures(results)])
    write_atomically(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
