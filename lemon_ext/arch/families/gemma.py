"""Gemma 2 and Gemma 3 (text): RMSNorm stream (V_zero) with four norms per layer (pre and post of
each branch, the post norms applied to the branch output before the residual add), norms computing
x * (1 + w), embeddings multiplied by sqrt(hidden_size) rounded to the activation dtype, logit and
attention soft-capping (act on values the expansion keeps: nothing to do), attention scaled by
query_pre_attn_scalar (kept), sliding-window layers by ``layer_types`` (older config.json files
have no list: Gemma 2 alternates sliding / full, Gemma 3 makes every ``sliding_window_pattern``-th
layer full; the target config gets the explicit list). Gemma 3 adds (1 + w) q/k norms over head_dim
and per-layer-type RoPE (``rope_local_base_freq``, unchanged)."""
from __future__ import annotations

from ..schema import Architecture
from .common import DECODER_FIELDS, DECODER_SHAPES, LEGACY_RENAMES, decoder_attention, decoder_layouts, swiglu

def _layer(qk_norm: bool) -> tuple[tuple[str, ...], ...]:
    """input norm, attention, post-attention norm (on the branch output), pre-FFN norm, SwiGLU,
    post-FFN norm (on the branch output)."""
    return (
        ("layers.{i}.input_layernorm.weight", "norm_weight"),
        *decoder_attention(qk_norm="head_dim" if qk_norm else None),
        ("layers.{i}.post_attention_layernorm.weight", "branch_norm_weight"),
        ("layers.{i}.pre_feedforward_layernorm.weight", "norm_weight"),
        *swiglu(),
        ("layers.{i}.post_feedforward_layernorm.weight", "branch_norm_weight"),
    )


GEMMA2 = Architecture(
    family="gemma2",
    model_types=("gemma2",),
    norm="rmsnorm",
    post_ln=False,
    explicit_head_dim=True,
    norm_offset=1.0,
    embed_scale="hidden ** 0.5",
    new_layer_zero="branch_norms",
    fields=DECODER_FIELDS,
    embeddings=(("embed_tokens.weight", "embed"),),
    layer=_layer(qk_norm=False),
    final=(("norm.weight", "norm_weight"),),
    # Gemma2Config's defaults for fields config.json may omit
    defaults={"tie_word_embeddings": True, "attention_bias": False, "rms_norm_eps": 1e-6, "head_dim": 256},
    shapes=DECODER_SHAPES,
    # Gemma2Config without layer_types: layer i is full attention when (i + 1) % 2 == 0
    layer_list_defaults={"layer_types": (("full_attention", "layer_step:2"), ("sliding_attention", None))},
    renames=LEGACY_RENAMES,
    layouts=decoder_layouts("Gemma2"),
)

GEMMA3_TEXT = Architecture(
    family="gemma3_text",
    model_types=("gemma3_text",),
    norm="rmsnorm",
    post_ln=False,
    explicit_head_dim=True,
    norm_offset=1.0,
    embed_scale="hidden ** 0.5",
    qk_norm="head_dim",
    new_layer_zero="branch_norms",
    fields=DECODER_FIELDS,
    embeddings=(("embed_tokens.weight", "embed"),),
    layer=_layer(qk_norm=True),
    final=(("norm.weight", "norm_weight"),),
    # Gemma3TextConfig's defaults for fields config.json may omit (sliding_window_pattern: the
    # older configs' pattern field, read by Gemma3TextConfig when layer_types is absent)
    defaults={"tie_word_embeddings": True, "attention_bias": False, "rms_norm_eps": 1e-6, "head_dim": 256,
              "sliding_window_pattern": 6},
    shapes=DECODER_SHAPES,
    layer_list_defaults={"layer_types": (("full_attention", "layer_step:sliding_window_pattern"),
                                         ("sliding_attention", None))},
    renames=LEGACY_RENAMES,
    layouts=decoder_layouts("Gemma3", models=("Gemma3TextModel",)),
)
