"""OLMo 2: RMSNorm stream (V_zero) without pre-norms: each branch reads the raw stream, and an
RMSNorm over the hidden axis is applied to the branch output before the residual add
(``post_attention_layernorm``, ``post_feedforward_layernorm``); q_norm / k_norm are RMSNorms over
the whole q / k projection (exact only when every head is replicated the same number of times:
other head counts are refused)."""
from __future__ import annotations

from ..schema import Architecture
from .common import DECODER_FIELDS, DECODER_SHAPES, LEGACY_RENAMES, decoder_attention, decoder_layouts, swiglu

OLMO2 = Architecture(
    family="olmo2",
    model_types=("olmo2",),
    norm="rmsnorm",
    post_ln=False,
    # Olmo2Config has no head_dim field, but Olmo2Attention reads one when a config carries it
    # (getattr(config, "head_dim", hidden // heads)): an explicit head_dim lets the head count grow
    # by an integer multiple at indivisible hidden widths (attention width != hidden).
    explicit_head_dim=True,
    qk_norm="projection",
    new_layer_zero="branch_norms",
    fields=DECODER_FIELDS,
    embeddings=(("embed_tokens.weight", "embed"),),
    layer=(
        *decoder_attention(qk_norm="projection"),
        ("layers.{i}.post_attention_layernorm.weight", "branch_norm_weight"),
        *swiglu(),
        ("layers.{i}.post_feedforward_layernorm.weight", "branch_norm_weight"),
    ),
    final=(("norm.weight", "norm_weight"),),
    # Olmo2Config's defaults for fields config.json may omit
    defaults={"tie_word_embeddings": False, "attention_bias": False, "rms_norm_eps": 1e-5},
    shapes=DECODER_SHAPES,
    renames=LEGACY_RENAMES,
    layouts=decoder_layouts("Olmo2"),
)
