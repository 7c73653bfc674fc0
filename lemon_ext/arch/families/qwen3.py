"""Qwen3: the Llama block plus RMSNorms over head_dim on q and k (q_norm / k_norm) and an explicit
head_dim that may differ from hidden / heads."""
from __future__ import annotations

from ..schema import Architecture
from .common import DECODER_FIELDS, DECODER_SHAPES, LEGACY_RENAMES, decoder_attention, decoder_layouts, swiglu

QWEN3 = Architecture(
    family="qwen3",
    model_types=("qwen3",),
    norm="rmsnorm",
    post_ln=False,
    explicit_head_dim=True,
    qk_norm="head_dim",
    fields=DECODER_FIELDS,
    embeddings=(("embed_tokens.weight", "embed"),),
    layer=(
        ("layers.{i}.input_layernorm.weight", "norm_weight"),
        *decoder_attention(qk_norm="head_dim"),
        ("layers.{i}.post_attention_layernorm.weight", "norm_weight"),
        *swiglu(),
    ),
    final=(("norm.weight", "norm_weight"),),
    defaults={"tie_word_embeddings": False},  # Qwen3Config's default (Qwen3-0.6B sets it true)
    shapes=DECODER_SHAPES,
    layer_thresholds=("max_window_layers",),
    renames=LEGACY_RENAMES,
    layouts=decoder_layouts("Qwen3"),
)
