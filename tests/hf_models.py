"""Tiny, randomly initialised Hugging Face models for tests (nothing is downloaded).

Every builder makes a two-layer model with hidden size 64, four heads, intermediate size 128 and a ~1000-token
vocabulary, seeded so two calls give the same weights. ``FAMILIES`` maps a family name to its builder; each builder
takes the attention implementation (``"eager"`` or ``"sdpa"``) and a dropout probability (0 gives an exact
deterministic model, > 0 is for train-mode tests).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import transformers

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB = 64, 2, 4, 128, 1000
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
IMAGE_SIZE, PATCH_SIZE = 32, 8


def _build(model_class: type, config: transformers.PreTrainedConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return model_class(config).eval()


def gpt2(attn_implementation: str = "eager", dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """GPT-2 causal LM (learned absolute positions, ``Conv1D`` projections, fused qkv)."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE, n_positions=128,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation=attn_implementation)
    return _build(transformers.GPT2LMHeadModel, config, seed)


def bert(attn_implementation: str = "eager", dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """BERT encoder with pooler (bidirectional padding mask, token type ids)."""
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE, max_position_embeddings=128, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, attn_implementation=attn_implementation)
    return _build(transformers.BertModel, config, seed)


def llama(attn_implementation: str = "eager", dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """Llama causal LM (rotary positions, RMSNorm, SwiGLU MLP)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=128,
        attention_dropout=dropout, attn_implementation=attn_implementation)
    return _build(transformers.LlamaForCausalLM, config, seed)


def qwen2(attn_implementation: str = "eager", dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """Qwen2 causal LM with grouped-query attention (2 key/value heads for 4 query heads)."""
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, intermediate_size=INTERMEDIATE, max_position_embeddings=128,
        attention_dropout=dropout, attn_implementation=attn_implementation)
    return _build(transformers.Qwen2ForCausalLM, config, seed)


def qwen3(attn_implementation: str = "eager", dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """Qwen3 causal LM (per-head RMSNorm on queries and keys, grouped-query attention)."""
    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, head_dim=HIDDEN // HEADS, intermediate_size=INTERMEDIATE,
        max_position_embeddings=128, attention_dropout=dropout, attn_implementation=attn_implementation)
    return _build(transformers.Qwen3ForCausalLM, config, seed)


def vit(attn_implementation: str = "eager", dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """ViT image classifier on 32x32 images with 8x8 patches (16 patches plus the class token), 10 classes."""
    config = transformers.ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_labels=10, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, attn_implementation=attn_implementation)
    return _build(transformers.ViTForImageClassification, config, seed)


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "gpt2": gpt2, "bert": bert, "llama": llama, "qwen2": qwen2, "qwen3": qwen3, "vit": vit,
}
TEXT_FAMILIES = ("gpt2", "bert", "llama", "qwen2", "qwen3")
CAUSAL_FAMILIES = ("gpt2", "llama", "qwen2", "qwen3")


def token_inputs(batch: int, length: int, padded: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``input_ids`` and an ``attention_mask``; with ``padded``, every other sequence is left-padded.

    Padding lengths differ between rows (1, 3, 5, ... tokens) so no two rows share a mask.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        for row in range(0, batch, 2):
            attention_mask[row, :min(length - 1, 1 + row)] = 0
    return input_ids, attention_mask


def image_inputs(batch: int, size: int = IMAGE_SIZE, seed: int = 1) -> torch.Tensor:
    """Random ``pixel_values`` of shape ``(batch, 3, size, size)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)
