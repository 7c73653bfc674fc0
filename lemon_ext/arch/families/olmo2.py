"""OLMo 2: RMSNorm stream (V_zero) without pre-norms: each branch reads the raw stream, and an
RMSNorm over the hidden axis is applied to the branch output before the residual add
(``post_attention_layernorm``, ``post_feedforward_layernorm``); q_norm / k_norm are RMSNorms over
the whole q / k projection (exact only when every head is replicated the same number of times:
other head counts are refused)."""
from __future__ import annotations

from ..schema import Architecture, Layout
from .common import LEGACY_RENAMES

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
    fields=dict(
        hidden_size="hidden_size", intermediate_size="intermediate_size",
        num_attention_heads="num_attention_heads", num_key_value_heads="num_key_value_heads",
        num_hidden_layers="num_hidden_layers", eps="rms_norm_eps", head_dim="head_dim",
    ),
    embeddings=(("embed_tokens.weight", "embed"),),
    layer=(
        ("layers.{i}.self_attn.q_proj.weight", "q_weight"),
        ("layers.{i}.self_attn.q_proj.bias?", "q_bias", "attention_bias"),
        ("layers.{i}.self_attn.k_proj.weight", "k_weight"),
        ("layers.{i}.self_attn.k_proj.bias?", "k_bias", "attention_bias"),
        ("layers.{i}.self_attn.v_proj.weight", "kv_weight"),
        ("layers.{i}.self_attn.v_proj.bias?", "kv_bias", "attention_bias"),
        ("layers.{i}.self_attn.o_proj.weight", "o_weight"),
        ("layers.{i}.self_attn.o_proj.bias?", "o_bias", "attention_bias"),
        ("layers.{i}.self_attn.q_norm.weight", "q_norm_projection"),
        ("layers.{i}.self_attn.k_norm.weight", "k_norm_projection"),
        ("layers.{i}.post_attention_layernorm.weight", "branch_norm_weight"),
        ("layers.{i}.mlp.gate_proj.weight", "up_weight"),
        ("layers.{i}.mlp.up_proj.weight", "up_weight"),
        ("layers.{i}.mlp.down_proj.weight", "down_weight"),
        ("layers.{i}.post_feedforward_layernorm.weight", "branch_norm_weight"),
    ),
    final=(("norm.weight", "norm_weight"),),
    # Olmo2Config's defaults for fields config.json may omit
    defaults={"tie_word_embeddings": False, "attention_bias": False, "rms_norm_eps": 1e-5},
    shapes={"embed_tokens.weight": ("vocab_size", "hidden"), "lm_head.weight": ("vocab_size", "hidden")},
    renames=LEGACY_RENAMES,
    layouts=(
        Layout("causal_lm", "model.", head=(("lm_head.weight", "head"),),
               tied=(("lm_head.weight", "model.embed_tokens.weight"),), final_norm=("model.norm.weight",),
               architectures=("Olmo2ForCausalLM",)),
        Layout("base", "", architectures=("Olmo2Model",)),
    ),
)
